//! Host side of husk: sandbox manager, OCI CLI, shim v2 and CRI arrive with later issues.
