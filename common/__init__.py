"""What every host part may import (the runner, the sandbox, the data builder): the kinds of error a user can
cause or fix. It imports nothing of the project."""
