//! One agent connection from TLS to goodbye: the handshake, `Hello`, then
//! either a control session (`Open`: takeover, `Welcome`, then `EndPoint`,
//! `GetHashes` and `Goodbye`), a data stream (`Join`, see [`crate::apply`])
//! or a restore (`Restore`, see [`crate::failback`]).
//! An error ends the connection with an `Error` frame to the agent.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pilotlight_protocol::codec::FrameCodec;
use pilotlight_protocol::frame::{CommitMode, VolumeDecl};
use pilotlight_protocol::limits::{
    FEATURE_CHECKPOINT, FEATURE_PARTIAL, FEATURE_PING, FEATURE_RESTORE, FEATURE_ZEROS, VERSION,
};
use pilotlight_protocol::{DecodeError, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::admission::Waiting;
use crate::commit::{Committer, EndPoint};
use crate::handshake::{self, AuthorizedPeer};
use crate::server::Shared;
use crate::session::{Session, SessionVolume};
use crate::store::blocking;
use crate::wire::{next, next_or_eof, send, send_in, unexpected, Reader, Writer};
use crate::ReceiveError;

/// How long the `Error` frame and the TLS shutdown may take at the end.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// After an error, how long the connection keeps reading (and dropping)
/// what the peer still sends, and how much of it.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 16 << 20;

/// Read and drop what the peer still sends, until it closes, for at most
/// [`LINGER`] and [`LINGER_BYTES`]. Closing a socket with unread bytes
/// makes the kernel reset the connection, and a peer that was still
/// writing (a data stream mid-point) would lose the `Error` frame sent just
/// before: it would see a reset instead of the reason.
async fn linger(rd: &mut Reader) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 << 10];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match rd.get_mut().read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Completes after `d`; never without one.
async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// One accepted TCP connection.
pub(crate) struct Connection {
    pub(crate) shared: Arc<Shared>,
    pub(crate) tls: TlsAcceptor,
    /// Cancelled when the receiver shuts down.
    pub(crate) cancel: CancellationToken,
    pub(crate) peer: SocketAddr,
}

impl Connection {
    /// Serve the connection to its end. It waits (`waiting`) for a
    /// pre-authentication place, its place until it has authenticated;
    /// then it takes a session slot (or gets `Busy`).
    pub(crate) async fn serve(self, tcp: TcpStream, waiting: Waiting) {
        if let Err(e) = pilotlight_protocol::net::tune(socket2::SockRef::from(&tcp)) {
            tracing::debug!(cause = %e, "cannot set TCP keepalive or nodelay");
        }
        let cfg = &self.shared.cfg;
        let place = tokio::select! {
            p = tokio::time::timeout(cfg.preauth_wait(), self.shared.admission.place(waiting)) => p.ok().flatten(),
            () = self.cancel.cancelled() => None,
        };
        let Some(preauth) = place else {
            metrics::counter!("pilotlight_receiver_preauth_refused_total").increment(1);
            tracing::debug!(peer = %self.peer, "connection dropped: no pre-authentication place in time");
            return;
        };
        let timeouts = (cfg.first_byte_timeout(), cfg.handshake_timeout());
        let Some(tls) = handshake::accept_tls(&self.tls, tcp, timeouts, self.peer).await else {
            return;
        };
        let authorized = handshake::authorize(&self.shared.store, &tls).await;
        drop(preauth);
        let _ = self.serve_authorized(tls, authorized).await;
    }

    /// The connection after TLS (`io`; an in-memory pipe under the session
    /// fuzzer, `crate::fuzzing`): a session slot, `Hello`, the role, and on
    /// failure the `Error` frame to the agent. Returns the error that ended
    /// the connection, already reported.
    pub(crate) async fn serve_authorized<S>(
        &self,
        io: S,
        authorized: Result<AuthorizedPeer, ReceiveError>,
    ) -> Result<(), ReceiveError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(io);
        let mut rd: Reader = FramedRead::new(Box::new(r), FrameCodec::default());
        let mut wr: Writer = Writer::new(Box::new(w), self.shared.cfg.write_timeout());
        let result = match authorized.and_then(|p| Ok((self.slot(&p)?, p))) {
            Ok((_slot, peer)) => self.session(&mut rd, &mut wr, peer).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.report(&mut wr, e).await;
        }
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, wr.get_mut().shutdown()).await;
        if result.is_err() {
            linger(&mut rd).await;
        }
        result
    }

    /// The connection slot of an authenticated connection: one its
    /// server's session kept for a data stream, or one of the free ones, or
    /// `Busy`.
    fn slot(
        &self,
        peer: &AuthorizedPeer,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ReceiveError> {
        match self.shared.registry.reserved_slot(peer.server_id)? {
            Some(slot) => Ok(slot),
            None => self.shared.admission.session(),
        }
    }

    /// Count, log and send to the agent the error that ends the connection.
    async fn report(&self, wr: &mut Writer, e: &ReceiveError) {
        let kind = format!("{:?}", e.code()).to_lowercase();
        metrics::counter!("pilotlight_receiver_errors_total", "kind" => kind).increment(1);
        match e {
            ReceiveError::Net(_) => {
                tracing::info!(peer = %self.peer, cause = %e, "connection lost")
            }
            _ => tracing::warn!(peer = %self.peer, cause = %e, "session closed with an error"),
        }
        let frame = Frame::Error {
            code: e.code(),
            message: e.to_string(),
        };
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, send(wr, &frame)).await;
    }

    /// `Hello` both ways, then the role the agent asks for.
    async fn session(
        &self,
        rd: &mut Reader,
        wr: &mut Writer,
        peer: AuthorizedPeer,
    ) -> Result<(), ReceiveError> {
        let timeout = self.shared.cfg.handshake_timeout();
        let features = match tokio::time::timeout(timeout, next(rd)).await {
            Err(_) => return Err(ReceiveError::Timeout("waiting for Hello")),
            Ok(f) => match f? {
                Frame::Hello { version, features } if version == VERSION => features,
                Frame::Hello { version, .. } => {
                    return Err(DecodeError::BadVersion {
                        got: version,
                        supported: VERSION,
                    }
                    .into())
                }
                other => return Err(unexpected(&other, "Hello")),
            },
        };
        let pings = features & FEATURE_PING != 0;
        let hello = Frame::Hello {
            version: VERSION,
            features: FEATURE_PING
                | FEATURE_CHECKPOINT
                | FEATURE_RESTORE
                | FEATURE_ZEROS
                | FEATURE_PARTIAL,
        };
        send(wr, &hello).await?;
        let first = match tokio::time::timeout(timeout, next(rd)).await {
            Err(_) => return Err(ReceiveError::Timeout("waiting for Open or Join")),
            Ok(f) => f?,
        };
        match first {
            Frame::Open {
                streams,
                commit,
                volumes,
            } => {
                let session = self.open(&peer, streams, commit, volumes).await?;
                // Room for every data stream now, or Busy before any connects.
                session.hold_slots(self.shared.admission.reserve(streams)?);
                let idle = pings.then(|| self.shared.cfg.control_idle_timeout());
                self.control(rd, wr, Arc::new(session), idle).await
            }
            Frame::Join { session } => {
                let idle = self.shared.cfg.idle_timeout();
                let sh = &self.shared;
                crate::apply::serve_stream(
                    &sh.registry,
                    &sh.store,
                    idle,
                    (rd, wr),
                    peer.server_id,
                    session,
                )
                .await
            }
            Frame::Restore(req) => {
                let idle = self.shared.cfg.idle_timeout();
                crate::failback::serve(
                    &self.shared.store,
                    (rd, wr),
                    &peer,
                    (features, req),
                    (&self.cancel, idle),
                )
                .await
            }
            other => Err(unexpected(&other, "Open, Join or Restore")),
        }
    }

    /// A new session for the volumes the agent declared.
    async fn open(
        &self,
        peer: &AuthorizedPeer,
        streams: u16,
        commit: CommitMode,
        decls: Vec<VolumeDecl>,
    ) -> Result<Session, ReceiveError> {
        let mut names = HashSet::new();
        for d in &decls {
            if !names.insert(d.name.clone()) {
                return Err(ReceiveError::Protocol(format!(
                    "volume {} declared twice",
                    d.name
                )));
            }
        }
        let store = self.shared.store.clone();
        let server_id = peer.server_id;
        let server = peer.server.clone();
        let volumes = blocking(move || {
            let cat = store.catalog()?;
            decls
                .iter()
                .map(|d| {
                    cat.check_volume(server_id, &d.name, d.block_size)?;
                    crate::staging::check_room(&store, &server, &d.name, d.size)?;
                    Ok(SessionVolume {
                        name: d.name.clone(),
                        size: d.size,
                        block_size: d.block_size,
                    })
                })
                .collect::<Result<Vec<_>, ReceiveError>>()
        })
        .await?;
        let cfg = &self.shared.cfg;
        let mut session = Session::new(
            rand::random(),
            server_id,
            peer.server.clone(),
            commit,
            streams,
            volumes,
            self.cancel.child_token(),
            cfg.max_pending_points,
            self.shared.store.clone(),
            cfg.session_inflight_bytes(),
        );
        session.serial = peer.serial.clone();
        session.max_point_blocks =
            crate::session::point_block_cap(&session.volumes, cfg.point_resend_factor);
        session.limits = cfg.limits_for(&session.server, &session.volumes);
        Ok(session)
    }

    /// Run a control session: take over from the server's previous session,
    /// list it in the registry, serve it, unlist it.
    async fn control(
        &self,
        rd: &mut Reader,
        wr: &mut Writer,
        session: Arc<Session>,
        idle: Option<Duration>,
    ) -> Result<(), ReceiveError> {
        let registry = &self.shared.registry;
        let result = match registry.take_over(&session).await {
            Ok(_turn) => match registry.enter(&session).await {
                Ok(()) => {
                    let result = self.control_loop(rd, wr, &session, idle).await;
                    registry.leave(&session).await.and(result)
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        // The last reference may drop the session, which cuts pack tails.
        let _ = tokio::task::spawn_blocking(move || drop(session)).await;
        result
    }

    /// `Welcome`, then the agent's requests until `Goodbye` or the end; with
    /// `idle`, a connection silent that long (not even a `Ping`) is closed.
    async fn control_loop(
        &self,
        rd: &mut Reader,
        wr: &mut Writer,
        session: &Arc<Session>,
        idle: Option<Duration>,
    ) -> Result<(), ReceiveError> {
        let store = self.shared.store.clone();
        let server_id = session.server_id;
        let last = blocking(move || store.catalog()?.latest_seq(server_id)).await?;
        let welcome = Frame::Welcome {
            session: session.id,
            store_id: self.shared.store.store_id(),
            last_point: last as u64,
        };
        send_in(wr, &welcome, session).await?;
        tracing::info!(server = %session.server, session = session.id, volumes = session.volumes.len(), "session opened");
        let committer = Committer::new(self.shared.store.clone(), self.shared.cfg.idle_timeout())
            .with_max_clock_skew(self.shared.cfg.max_clock_skew());
        loop {
            let frame = tokio::select! {
                () = session.cancel.cancelled() => {
                    return Err(if self.cancel.is_cancelled() { ReceiveError::Shutdown } else { session.cancel_reason() });
                }
                f = next_or_eof(rd) => match f? {
                    Some(f) => f,
                    None => return Ok(()),
                },
                () = sleep_opt(idle) => {
                    return Err(ReceiveError::Timeout("control connection silent (no request, no Ping)"));
                }
            };
            match frame {
                Frame::Ping => {}
                Frame::EndPoint {
                    tag,
                    blocks,
                    created_ms,
                    consistency,
                    commit,
                } => {
                    let end = EndPoint {
                        tag,
                        blocks,
                        created_ms,
                        consistency,
                        commit,
                    };
                    self.end_point(wr, &committer, session, end).await?;
                }
                Frame::GetHashes { volume } => {
                    crate::hashes::send_hashes(wr, &self.shared.store, session, volume).await?
                }
                Frame::Checkpoint {
                    tag,
                    blocks,
                    done,
                    total,
                } => {
                    let req = crate::checkpoint::CheckpointRequest {
                        tag,
                        blocks,
                        done,
                        total,
                    };
                    let store = &self.shared.store;
                    let idle = self.shared.cfg.idle_timeout();
                    let answer = crate::checkpoint::checkpoint(store, idle, session, req).await?;
                    send_in(wr, &answer, session).await?;
                }
                Frame::Resume { sync, generation } => {
                    let store = &self.shared.store;
                    let answer =
                        crate::checkpoint::resume(store, session, sync, generation).await?;
                    send_in(wr, &answer, session).await?;
                }
                Frame::Goodbye => {
                    session.ended.store(true, Ordering::SeqCst);
                    return Ok(());
                }
                other => {
                    return Err(unexpected(
                        &other,
                        "EndPoint, GetHashes, Checkpoint, Resume or Goodbye",
                    ))
                }
            }
        }
    }

    /// The commit order of [`crate::commit`]: steps 1 to 3 (pack fsync,
    /// directory fsync, SQLite commit) in the committer, then step 4, the
    /// `DURABLE` ack, then step 5, the staging update, queued to its task.
    async fn end_point(
        &self,
        wr: &mut Writer,
        committer: &Committer,
        session: &Arc<Session>,
        end: EndPoint,
    ) -> Result<(), ReceiveError> {
        let point = committer.commit(session, end).await?;
        let durable = Frame::Durable {
            tag: end.tag,
            point: point.seq as u64,
        };
        send_in(wr, &durable, session).await?;
        self.shared
            .staging
            .request(&session.server, session.server_id, point.key)
            .await;
        Ok(())
    }
}
