//! Names both ends of a TLS connection must agree on.

/// The DNS name in the receiver's certificate that agents verify.
pub const RECEIVER_NAME: &str = "pilotlight-receiver";

/// ALPN protocol id of version 1 of the protocol.
pub const ALPN: &[u8] = b"pilotlight/1";
