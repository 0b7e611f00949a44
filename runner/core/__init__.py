"""The core every wing stands on: the ledger (the one record of a night), settings and options, the keep
rule's arithmetic (decision, detectability), the rules of which runs count (runs), the night's figures,
errors a user can cause, inputs and diffs. It imports neither the night nor the morning."""
