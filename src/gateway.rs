//! Gateway mode: callers, their policies, and the checks that keep one store inside its own
//! Tango accounts.

pub mod bindings;
pub mod json;
pub mod path;
