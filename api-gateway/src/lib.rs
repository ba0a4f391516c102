//! The api-gateway: the suite's front door.
//!
//! - [`passwords`]: argon2id hashing.
//! - [`tokens`]: access JWTs signed here and published as a JWKS; opaque refresh tokens.
//! - [`store`]: users and refresh-token families (rotation with reuse detection).
//! - [`limiter`]: rate limits shared by every replica through Redis, with a local fallback.
//! - [`http`]: the public router and the admin router.

pub mod http;
pub mod limiter;
pub mod passwords;
pub mod settings;
pub mod startup;
pub mod store;
pub mod tokens;

pub use settings::Settings;
pub use startup::Application;
