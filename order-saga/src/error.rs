//! The saga services' handler error: the suite's shared one ([`common::error`]), so a failure
//! is answered as in every service. Client faults are 4xx naming what is wrong; an
//! unreachable database is a 503 with `Retry-After`; a refused statement or a bug is a 500,
//! its cause logged and never sent.

pub use common::error::{Error, Result};
