//! The gateway's error type for its own endpoints (`/auth/*`, `/admin/*`): the suite's shared
//! one ([`common::error`]), so a failure is answered as in every service. Client faults are
//! 4xx naming what is wrong; an unreachable database is a 503 with `Retry-After`; a refused
//! statement or a bug is a 500, its cause logged and never sent. Proxied requests answer
//! with the upstream's status and are not this type's concern.

pub use common::error::{Error, Result};
