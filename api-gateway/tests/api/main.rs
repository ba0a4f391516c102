//! Integration tests: the real gateway on port 0 against a real PostgreSQL (a fresh database
//! per test), a real Redis (a key prefix per test) and real upstream servers.

mod auth;
mod end_to_end;
mod gateway;
mod helpers;
mod keys;
mod limiter;
mod proxy;
mod unstorable;
