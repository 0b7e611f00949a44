"""The morning: the commands that read a night's record (status, list, show, report, review, rerun, verify)
and their presentations. They read the ledger through the core, never the night's internals."""
