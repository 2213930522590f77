//! The server's integration tests, in one test binary (a module per area, as in the other
//! crates, so a new area is a module rather than another binary to link).

mod api;
