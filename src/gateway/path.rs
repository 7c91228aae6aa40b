//! (filled in by the gateway policy work)
