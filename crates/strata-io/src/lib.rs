//! strata-io
