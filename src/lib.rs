//! capgate
