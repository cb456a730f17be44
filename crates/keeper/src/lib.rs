//! pgquorum-keeper (placeholder)
