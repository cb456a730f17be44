//! pgquorum-testkit (placeholder)
