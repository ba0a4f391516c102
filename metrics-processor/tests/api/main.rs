//! HTTP tests of metrics-processor: each test spawns the real service on port 0 and speaks
//! HTTP to it. One binary for every API test, so the crate links once.

mod aggregates;
mod events;
mod helpers;
mod operations;
