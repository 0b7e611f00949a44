# The base image: a runtime image (offline root filesystem or images/Dockerfile) plus
# the trusted harness. sandbox/images.py builds it; experiment images add train.py only.
ARG RUNTIME
FROM ${RUNTIME}
ARG UID
# What the runtime was built from (the upstream image at its digest, or the offline runtime's
# tag): a label every experiment image inherits, so each run records it.
ARG RUNTIME_ORIGIN
# The harness (prepare.py, evaluate.py, contract.py) comes from the build context root-owned with mode 0444:
# nobody can change it.
COPY prepare.py evaluate.py contract.py /app/
# The root filesystem is read-only at run time: HOME and every cache live in the /tmp tmpfs.
ENV PYTHONPATH=/opt/deps HOME=/tmp PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER ${UID}:${UID}
WORKDIR /app
LABEL autoresearch.kind=base autoresearch.runtime=${RUNTIME_ORIGIN}
