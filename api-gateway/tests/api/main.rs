//! Integration tests: the real gateway on port 0 against a real PostgreSQL (a fresh database
//! per test).

mod auth;
mod helpers;
mod limiter;
