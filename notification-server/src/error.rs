//! The notifier's handler error: the suite's shared one ([`common::error`]), so a failure is
//! answered as in every service, plus the notifier's own input error. Client faults are 4xx
//! naming what is wrong; an unreachable database is a 503 with `Retry-After`; a refused
//! statement or a bug is a 500, its cause logged and never sent.

use common::problem::Problem;

pub use common::error::{Error, Result};

use crate::notification::Invalid;

impl From<Invalid> for Error {
    fn from(invalid: Invalid) -> Self {
        Self::Refused(Problem::invalid_field(&invalid.field, invalid.detail))
    }
}
