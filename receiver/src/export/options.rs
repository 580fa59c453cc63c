//! The handshake and option haggling of fixed newstyle NBD: the greeting,
//! the client's flags, then options until `NBD_OPT_GO` (or
//! `NBD_OPT_EXPORT_NAME`) starts transmission or `NBD_OPT_ABORT` ends it.
//!
//! Served: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (the one
//! context, `base:allocation`), and `STARTTLS` where the export wants TLS:
//! then every option but `STARTTLS` and `ABORT` is answered
//! `NBD_REP_ERR_TLS_REQD` until the client has switched to TLS (and
//! `EXPORT_NAME` closes the connection). Every other option is answered
//! `NBD_REP_ERR_UNSUP`. Each option's length is checked against
//! [`MAX_OPTION_LEN`] before anything is read into memory, and a connection
//! gets at most [`MAX_OPTIONS`] options.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::connection::ConnError;
use super::wire::*;

/// What the server tells clients about its one export.
pub(crate) struct ExportInfo {
    /// `SERVER/VOLUME`.
    pub(crate) name: String,
    /// A sentence for humans (`NBD_INFO_DESCRIPTION`).
    pub(crate) description: String,
    /// Bytes.
    pub(crate) size: u64,
    /// Transmission flags.
    pub(crate) flags: u16,
    /// Preferred block size.
    pub(crate) preferred_block: u32,
}

impl ExportInfo {
    /// Whether `name` selects the export (its name, or the default export).
    fn is(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// What the client chose during option haggling.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Negotiated {
    /// Structured replies.
    pub(crate) structured: bool,
    /// The id of `base:allocation`, if selected.
    pub(crate) allocation: Option<u32>,
}

/// The context id of `base:allocation`.
const ALLOCATION_ID: u32 = 1;

/// How haggling ended.
pub(crate) enum Haggled {
    /// Transmission starts.
    Transmit(Negotiated),
    /// The client aborted.
    Aborted,
    /// `STARTTLS` was acknowledged: the TLS handshake comes next, then
    /// haggling again (`Tls::Done`) over TLS.
    StartTls,
}

/// Where TLS stands on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tls {
    /// Plain NBD (loopback or a unix socket); `STARTTLS` is not offered.
    Off,
    /// TLS is required and not started yet.
    Required,
    /// The connection runs over TLS now.
    Done,
}

/// Greet the client; returns whether it asked for no zeroes after
/// `EXPORT_NAME`.
pub(crate) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, ConnError> {
    let mut out = BytesMut::with_capacity(32);
    out.put_u64(NBD_MAGIC);
    out.put_u64(OPT_MAGIC);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    send(s, &mut out).await?;
    let client_flags = s.read_u32().await?;
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ConnError::Malformed("unknown client flags"));
    }
    Ok(client_flags & u32::from(FLAG_NO_ZEROES) != 0)
}

/// Greet the client and haggle until transmission starts or it aborts
/// (plain NBD).
#[cfg(test)]
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &ExportInfo,
) -> Result<Haggled, ConnError> {
    let no_zeroes = greet(s).await?;
    haggle(s, export, no_zeroes, Tls::Off).await
}

/// Haggle over options until transmission starts, the client aborts, or
/// (with `Tls::Required`) it asks for TLS.
pub(crate) async fn haggle<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &ExportInfo,
    no_zeroes: bool,
    tls: Tls,
) -> Result<Haggled, ConnError> {
    let mut out = BytesMut::with_capacity(256);
    let mut state = Negotiated::default();
    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; OPTION_HEADER_LEN];
        s.read_exact(&mut head).await?;
        let mut f = Fields(&head);
        let (magic, option, len) = (
            f.u64().unwrap_or(0),
            f.u32().unwrap_or(0),
            f.u32().unwrap_or(0),
        );
        if magic != OPT_MAGIC {
            return Err(ConnError::Malformed("option without IHAVEOPT"));
        }
        if len > MAX_OPTION_LEN {
            return Err(ConnError::TooLarge {
                what: "option",
                len: u64::from(len),
            });
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match (option, tls) {
            (OPT_STARTTLS, Tls::Required) if data.is_empty() => {
                option_reply(&mut out, option, REP_ACK, &[]);
                send(s, &mut out).await?;
                return Ok(Haggled::StartTls);
            }
            (OPT_STARTTLS, Tls::Required) => {
                error(&mut out, option, REP_ERR_INVALID, "no data expected");
                send(s, &mut out).await?;
                continue;
            }
            (OPT_STARTTLS, Tls::Done) => {
                error(&mut out, option, REP_ERR_INVALID, "TLS is already on");
                send(s, &mut out).await?;
                continue;
            }
            (OPT_EXPORT_NAME, Tls::Required) => {
                return Err(ConnError::Malformed("EXPORT_NAME before the TLS it needs"));
            }
            (OPT_ABORT, _) | (_, Tls::Off | Tls::Done) => {}
            (_, Tls::Required) => {
                error(
                    &mut out,
                    option,
                    REP_ERR_TLS_REQD,
                    "this export is served over TLS only: STARTTLS first",
                );
                send(s, &mut out).await?;
                continue;
            }
        }
        match option {
            OPT_EXPORT_NAME => {
                if !export.is(&data) {
                    return Err(ConnError::UnknownExport);
                }
                out.put_u64(export.size);
                out.put_u16(export.flags);
                if !no_zeroes {
                    out.put_bytes(0, 124);
                }
                send(s, &mut out).await?;
                return Ok(Haggled::Transmit(state));
            }
            OPT_ABORT => {
                option_reply(&mut out, option, REP_ACK, &[]);
                // The client may already be gone: nothing to report then.
                let _ = send(s, &mut out).await;
                return Ok(Haggled::Aborted);
            }
            OPT_INFO | OPT_GO => {
                let ok = info(&mut out, option, &data, export);
                let go = ok && option == OPT_GO;
                send(s, &mut out).await?;
                if go {
                    return Ok(Haggled::Transmit(state));
                }
            }
            _ => {
                answer(&mut out, option, &data, export, &mut state);
                send(s, &mut out).await?;
            }
        }
    }
    Err(ConnError::Malformed("too many options"))
}

/// Answer an option that does not end haggling.
fn answer(out: &mut BytesMut, option: u32, data: &[u8], export: &ExportInfo, st: &mut Negotiated) {
    match option {
        OPT_LIST if data.is_empty() => {
            let mut server = BytesMut::new();
            server.put_u32(export.name.len() as u32);
            server.put_slice(export.name.as_bytes());
            option_reply(out, option, REP_SERVER, &server);
            option_reply(out, option, REP_ACK, &[]);
        }
        OPT_STRUCTURED_REPLY if data.is_empty() => {
            st.structured = true;
            option_reply(out, option, REP_ACK, &[]);
        }
        OPT_LIST | OPT_STRUCTURED_REPLY => error(out, option, REP_ERR_INVALID, "no data expected"),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => meta_context(out, option, data, export, st),
        _ => error(
            out,
            option,
            REP_ERR_UNSUP,
            "option not supported by this server",
        ),
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`; returns whether it succeeded.
fn info(out: &mut BytesMut, option: u32, data: &[u8], export: &ExportInfo) -> bool {
    let mut f = Fields(data);
    let parsed = (|| {
        let name = f.string()?;
        let n = f.u16()?;
        let mut wanted = Vec::new();
        for _ in 0..n {
            wanted.push(f.u16()?);
        }
        f.is_empty().then_some((name, wanted))
    })();
    let Some((name, wanted)) = parsed else {
        error(out, option, REP_ERR_INVALID, "malformed request");
        return false;
    };
    if !export.is(name) {
        error(out, option, REP_ERR_UNKNOWN, &unknown(name, export));
        return false;
    }
    let mut item = BytesMut::new();
    item.put_u16(INFO_EXPORT);
    item.put_u64(export.size);
    item.put_u16(export.flags);
    option_reply(out, option, REP_INFO, &item);
    item.clear();
    item.put_u16(INFO_BLOCK_SIZE);
    item.put_u32(1);
    item.put_u32(export.preferred_block);
    item.put_u32(MAX_PAYLOAD);
    option_reply(out, option, REP_INFO, &item);
    if wanted.contains(&INFO_NAME) {
        item.clear();
        item.put_u16(INFO_NAME);
        item.put_slice(export.name.as_bytes());
        option_reply(out, option, REP_INFO, &item);
    }
    if wanted.contains(&INFO_DESCRIPTION) {
        item.clear();
        item.put_u16(INFO_DESCRIPTION);
        item.put_slice(export.description.as_bytes());
        option_reply(out, option, REP_INFO, &item);
    }
    option_reply(out, option, REP_ACK, &[]);
    true
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
fn meta_context(
    out: &mut BytesMut,
    option: u32,
    data: &[u8],
    export: &ExportInfo,
    st: &mut Negotiated,
) {
    let set = option == OPT_SET_META_CONTEXT;
    if set {
        // A SET replaces the selection, even when it fails.
        st.allocation = None;
    }
    if !st.structured {
        return error(
            out,
            option,
            REP_ERR_INVALID,
            "negotiate structured replies first",
        );
    }
    let mut f = Fields(data);
    let parsed = (|| {
        let name = f.string()?;
        let n = f.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(f.string()?);
        }
        f.is_empty().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return error(out, option, REP_ERR_INVALID, "malformed request");
    };
    if !export.is(name) {
        return error(out, option, REP_ERR_UNKNOWN, &unknown(name, export));
    }
    let exact = queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes());
    let matches = if set {
        exact
    } else {
        queries.is_empty() || exact || queries.iter().any(|q| *q == b"base:")
    };
    if matches {
        let id = if set { ALLOCATION_ID } else { 0 };
        let mut ctx = BytesMut::new();
        ctx.put_u32(id);
        ctx.put_slice(BASE_ALLOCATION.as_bytes());
        option_reply(out, option, REP_META_CONTEXT, &ctx);
        if set {
            st.allocation = Some(ALLOCATION_ID);
        }
    }
    option_reply(out, option, REP_ACK, &[]);
}

fn unknown(name: &[u8], export: &ExportInfo) -> String {
    format!(
        "no export named {:?}; this server exports {:?}",
        String::from_utf8_lossy(name.get(..name.len().min(256)).unwrap_or_default()),
        export.name
    )
}

/// An error reply with a message for humans.
fn error(out: &mut BytesMut, option: u32, kind: u32, message: &str) {
    option_reply(out, option, kind, message.as_bytes());
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, out: &mut BytesMut) -> Result<(), ConnError> {
    s.write_all(out).await?;
    s.flush().await?;
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic)] // test code
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn export() -> ExportInfo {
        ExportInfo {
            name: "db1/root".into(),
            description: "test".into(),
            size: 1 << 20,
            flags: TF_HAS_FLAGS | TF_READ_ONLY,
            preferred_block: 4096,
        }
    }

    /// Random bytes after a valid start never panic and never hang: haggling
    /// ends with an error, an abort or transmission.
    #[tokio::test]
    async fn random_option_bytes_end_haggling_cleanly() {
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (mut client, mut server) = tokio::io::duplex(1 << 16);
            let mut input = BytesMut::new();
            input.put_u32(3);
            for _ in 0..(seed % 5) {
                let mut junk = vec![0u8; 24];
                rng.fill_bytes(&mut junk);
                input.put_u64(OPT_MAGIC);
                // Small options of every kind, random lengths and contents.
                input.put_u32(junk[0] as u32 % 12);
                let len = u32::from(junk[1] % 24);
                input.put_u32(len);
                input.put_slice(&junk[..len as usize]);
            }
            let mut tail = vec![0u8; (seed % 40) as usize];
            rng.fill_bytes(&mut tail);
            input.put_slice(&tail);
            client.write_all(&input).await.unwrap();
            drop(client.shutdown().await);
            let info = export();
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                negotiate(&mut server, &info),
            )
            .await
            .expect("haggling ends");
            drop(r);
        }
    }

    /// Option haggling as a real client does it: structured replies,
    /// SET_META_CONTEXT for base:allocation, then GO on the default export.
    #[tokio::test]
    async fn structured_replies_and_base_allocation_are_negotiated() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let mut input = BytesMut::new();
        input.put_u32(3);
        // SET_META_CONTEXT before structured replies: invalid.
        let mut meta = BytesMut::new();
        meta.put_u32(0);
        meta.put_u32(1);
        meta.put_u32(BASE_ALLOCATION.len() as u32);
        meta.put_slice(BASE_ALLOCATION.as_bytes());
        for (opt, data) in [
            (OPT_SET_META_CONTEXT, &meta[..]),
            (OPT_STRUCTURED_REPLY, &[][..]),
            (OPT_SET_META_CONTEXT, &meta[..]),
            (OPT_GO, &[0, 0, 0, 0, 0, 0][..]),
        ] {
            input.put_u64(OPT_MAGIC);
            input.put_u32(opt);
            input.put_u32(data.len() as u32);
            input.put_slice(data);
        }
        client.write_all(&input).await.unwrap();
        let info = export();
        let haggled = negotiate(&mut server, &info).await.unwrap();
        let Haggled::Transmit(neg) = haggled else {
            unreachable!("GO starts transmission")
        };
        assert!(neg.structured);
        assert_eq!(neg.allocation, Some(ALLOCATION_ID));
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        // Greeting, then the first reply: NBD_REP_ERR_INVALID to option 10.
        let mut first = Fields(&out[18..38]);
        assert_eq!(first.u64(), Some(REPLY_MAGIC));
        assert_eq!(first.u32(), Some(OPT_SET_META_CONTEXT));
        assert_eq!(first.u32(), Some(REP_ERR_INVALID));
    }
}
