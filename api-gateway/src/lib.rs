//! The api-gateway: the suite's front door.
//!
//! - [`passwords`]: argon2id hashing.
//! - [`tokens`]: access JWTs signed here and published as a JWKS; opaque refresh tokens.
//! - [`error`]: the one error type of the gateway's own endpoints: client faults, outages
//!   (503, retry) and refusals (500, no retry).
//! - [`store`]: users and refresh-token families (rotation with reuse detection).
//! - [`routes`]: path normalisation and the RBAC route table; [`config`]: the route file.
//! - [`authn`]: who is calling: access tokens (cached verification) and API keys, and the
//!   extractors the gateway's own endpoints take.
//! - [`audit`]: the hash-chained audit trail; [`client_ip`]: who a request comes from.
//! - [`limiter`]: rate limits shared by every replica through Redis, with a local fallback.
//! - [`revocations`]: API-key revocations told to every replica through Redis.
//! - [`http`]: the public router and the admin router.
//! - [`proxy`]: forwarding `/api/*` to upstream pools (sticky hashing, breakers, health checks).

pub mod audit;
pub mod authn;
pub mod client_ip;
pub mod config;
pub mod error;
pub mod http;
pub mod limiter;
pub mod passwords;
pub mod proxy;
pub mod revocations;
pub mod routes;
pub mod settings;
pub mod startup;
pub mod store;
pub mod tokens;

pub use settings::Settings;
pub use startup::Application;
