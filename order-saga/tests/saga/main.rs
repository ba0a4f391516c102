//! The order saga end to end, with the provider and the four services as real processes
//! over the real PostgreSQL and Redis. Every test ends by checking the invariants.

mod api;
mod crashes;
mod flow;
mod messaging;
mod payments;
mod system;
