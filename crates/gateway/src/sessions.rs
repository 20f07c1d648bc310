//! Who holds this gateway's sockets: per user (and session) and per client address.
//!
//! The table admits a connection under the caps (`WS_MAX_CONNECTIONS_PER_USER`,
//! `WS_MAX_CONNECTIONS_PER_IP`), and it is how a revoked session's sockets are found:
//!
//! - **At once**, by the revocation frame the API publishes on the user's channel
//!   (`mobile_events::revocation`) after the commit that ended the session: every
//!   gateway holding a socket of the user follows that channel, and the hub hands
//!   the frame here ([`Sessions::revoke`]).
//! - **Eventually**, should that frame be lost (Redis restarting at that moment), by
//!   [`sweep`]: every `WS_SESSION_CHECK_SECONDS` the sessions of open sockets are
//!   checked against PostgreSQL, and those revoked or gone are closed the same way.
//!
//! Either way a socket is closed by its [`Evict`] switch, with 4001 `session_revoked`.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use mobile_domain::{SessionId, UserId};
use mobile_events::Revoke;
use mobile_runtime::client_ip::ClientIp;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::hub::{ConnId, Evict, Eviction};

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `WS_MAX_CONNECTIONS_PER_USER`.
    User,
    /// `WS_MAX_CONNECTIONS_PER_IP`.
    Address,
}

/// The open sockets, shared by the upgrade handler, the hub and the sweep.
#[derive(Debug, Clone)]
pub struct Sessions {
    table: Arc<Mutex<Table>>,
    per_user: usize,
    per_ip: usize,
}

#[derive(Debug, Default)]
struct Table {
    users: HashMap<UserId, Vec<Live>>,
    addresses: HashMap<ClientIp, usize>,
}

#[derive(Debug)]
struct Live {
    conn: ConnId,
    session: SessionId,
    evict: Evict,
}

impl Sessions {
    /// `per_ip` 0 means no cap per address.
    pub fn new(per_user: usize, per_ip: usize) -> Self {
        Self {
            table: Arc::default(),
            per_user,
            per_ip,
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a socket from `address`, if the address has room.
    pub fn admit_address(&self, address: ClientIp) -> Result<AddressTicket, Refusal> {
        if self.per_ip == 0 {
            return Ok(AddressTicket(None));
        }
        let mut table = self.table();
        let count = table.addresses.entry(address).or_default();
        if *count >= self.per_ip {
            return Err(Refusal::Address);
        }
        *count += 1;
        Ok(AddressTicket(Some((self.clone(), address))))
    }

    /// Registers a socket of `user` under `session`, if the user has room.
    pub fn admit(
        &self,
        user: UserId,
        session: SessionId,
        conn: ConnId,
        evict: Evict,
    ) -> Result<Ticket, Refusal> {
        let mut table = self.table();
        let live = table.users.entry(user).or_default();
        if live.len() >= self.per_user {
            return Err(Refusal::User);
        }
        live.push(Live {
            conn,
            session,
            evict,
        });
        Ok(Ticket {
            sessions: self.clone(),
            user,
            conn,
        })
    }

    /// Closes the sockets of `user` that `revoke` ends; returns how many.
    pub fn revoke(&self, user: UserId, revoke: Revoke) -> usize {
        let table = self.table();
        let ended = table
            .users
            .get(&user)
            .into_iter()
            .flatten()
            .filter(|live| revoke.ends(live.session));
        let mut count = 0;
        for live in ended {
            live.evict.evict(Eviction::SessionRevoked);
            count += 1;
        }
        count
    }

    /// The sessions with a socket here.
    pub fn live_sessions(&self) -> Vec<SessionId> {
        let table = self.table();
        let sessions: HashSet<SessionId> = table
            .users
            .values()
            .flatten()
            .map(|live| live.session)
            .collect();
        sessions.into_iter().collect()
    }

    /// Closes every socket of the sessions in `ended`; returns how many.
    pub fn revoke_sessions(&self, ended: &HashSet<SessionId>) -> usize {
        let table = self.table();
        let mut count = 0;
        for live in table.users.values().flatten() {
            if ended.contains(&live.session) {
                live.evict.evict(Eviction::SessionRevoked);
                count += 1;
            }
        }
        count
    }
}

/// A socket's place in the table; dropping it frees the place.
#[derive(Debug)]
pub struct Ticket {
    sessions: Sessions,
    user: UserId,
    conn: ConnId,
}

impl Ticket {
    /// The socket now goes on under another session of the same user (a refreshed
    /// token from a new sign-in).
    pub fn set_session(&self, session: SessionId) {
        let mut table = self.sessions.table();
        if let Some(live) = table
            .users
            .get_mut(&self.user)
            .and_then(|live| live.iter_mut().find(|live| live.conn == self.conn))
        {
            live.session = session;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut table = self.sessions.table();
        if let Some(live) = table.users.get_mut(&self.user) {
            live.retain(|live| live.conn != self.conn);
            if live.is_empty() {
                table.users.remove(&self.user);
            }
        }
    }
}

/// A socket's count against its address; dropping it frees the place.
#[derive(Debug)]
pub struct AddressTicket(Option<(Sessions, ClientIp)>);

impl Drop for AddressTicket {
    fn drop(&mut self) {
        if let Some((sessions, address)) = self.0.take() {
            let mut table = sessions.table();
            if let Some(count) = table.addresses.get_mut(&address) {
                *count -= 1;
                if *count == 0 {
                    table.addresses.remove(&address);
                }
            }
        }
    }
}

/// Sessions asked about per query.
const SWEEP_CHUNK: usize = 10_000;

/// Every `interval` until `stop`: closes the sockets of sessions PostgreSQL no longer
/// has live. A failed check is retried at the next interval.
pub async fn sweep(sessions: Sessions, db: PgPool, interval: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let held = sessions.live_sessions();
        let mut ended = HashSet::new();
        for chunk in held.chunks(SWEEP_CHUNK) {
            match mobile_db::sessions::live_sessions(&db, chunk).await {
                Ok(live) => {
                    let live: HashSet<SessionId> = live.into_iter().collect();
                    ended.extend(chunk.iter().filter(|s| !live.contains(s)).copied());
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot check sessions; retrying at the next interval");
                    break;
                }
            }
        }
        if !ended.is_empty() {
            let closed = sessions.revoke_sessions(&ended);
            tracing::info!(
                sessions = ended.len(),
                sockets = closed,
                "closing sockets of sessions that ended"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_user_and_per_address_free_their_places_on_drop() {
        let sessions = Sessions::new(2, 1);
        let (ann, session) = (UserId::new(), SessionId::new());
        let first = sessions.admit(ann, session, 1, Evict::default()).unwrap();
        let _second = sessions.admit(ann, session, 2, Evict::default()).unwrap();
        assert_eq!(
            sessions
                .admit(ann, session, 3, Evict::default())
                .unwrap_err(),
            Refusal::User
        );
        assert!(
            sessions
                .admit(UserId::new(), session, 4, Evict::default())
                .is_ok()
        );
        drop(first);
        assert!(sessions.admit(ann, session, 5, Evict::default()).is_ok());

        let address = ClientIp::Known([203, 0, 113, 1].into());
        let held = sessions.admit_address(address).unwrap();
        assert_eq!(
            sessions.admit_address(address).unwrap_err(),
            Refusal::Address
        );
        drop(held);
        assert!(sessions.admit_address(address).is_ok());
        // 0: no cap.
        let open = Sessions::new(1, 0);
        let tickets: Vec<_> = (0..100)
            .map(|_| open.admit_address(address).unwrap())
            .collect();
        assert_eq!(tickets.len(), 100);
    }

    #[test]
    fn a_revocation_closes_exactly_the_sockets_of_the_sessions_it_ends() {
        let sessions = Sessions::new(10, 0);
        let ann = UserId::new();
        let (phone, tablet) = (SessionId::new(), SessionId::new());
        let evicts: Vec<Evict> = (0..3).map(|_| Evict::default()).collect();
        let _a = sessions.admit(ann, phone, 1, evicts[0].clone()).unwrap();
        let _b = sessions.admit(ann, phone, 2, evicts[1].clone()).unwrap();
        let tablet_ticket = sessions.admit(ann, tablet, 3, evicts[2].clone()).unwrap();

        assert_eq!(sessions.revoke(UserId::new(), Revoke::All), 0);
        assert_eq!(sessions.revoke(ann, Revoke::Session(phone)), 2);
        assert!(evicts[0].is_evicted() && evicts[1].is_evicted());
        assert!(!evicts[2].is_evicted());

        // After a refresh under a new sign-in, the socket belongs to that session.
        let new_session = SessionId::new();
        tablet_ticket.set_session(new_session);
        assert_eq!(sessions.revoke(ann, Revoke::Session(tablet)), 0);
        assert_eq!(sessions.revoke(ann, Revoke::AllBut(new_session)), 2);
        assert!(!evicts[2].is_evicted());
        let ended: HashSet<SessionId> = [new_session].into();
        assert_eq!(sessions.revoke_sessions(&ended), 1);
        assert!(evicts[2].is_evicted());
    }
}
