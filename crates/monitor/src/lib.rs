//! pgquorum-monitor (placeholder)
