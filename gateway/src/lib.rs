//! The llorch gateway (filled in by the gateway issue).
