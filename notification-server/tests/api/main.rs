//! Integration tests: the real service on port 0, over real HTTP and WebSocket connections,
//! with the memory engine and with a real PostgreSQL (and Redis for several nodes).

mod auth;
mod cluster;
mod delivery;
mod frames;
mod helpers;
mod http_api;
mod operations;
mod unstorable;
