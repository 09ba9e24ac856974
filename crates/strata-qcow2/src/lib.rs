//! strata-qcow2
