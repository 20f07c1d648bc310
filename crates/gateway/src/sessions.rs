//! Who holds this gateway's sockets: per user (and session) and per client address.
//!
//! The table admits a connection under the caps (`WS_MAX_CONNECTIONS_PER_USER`,
//! `WS_MAX_CONNECTIONS_PER_IP`); it keeps each user's budgets for what costs
//! PostgreSQL (subscribes, events replayed), shared by the user's sockets and kept a
//! while after the last one closes, so reconnecting does not refill them; and it is
//! how a revoked session's sockets are found:
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

use mobile_db::Db;
use mobile_domain::{SessionId, UserId};
use mobile_events::Revoke;
use mobile_runtime::client_ip::ClientIp;
use tokio_util::sync::CancellationToken;

use crate::{
    bucket::Bucket,
    hub::{ConnId, Evict, Eviction},
};

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `WS_MAX_CONNECTIONS_PER_USER`.
    User,
    /// `WS_MAX_CONNECTIONS_PER_IP`.
    Address,
}

/// What one user may cost PostgreSQL, on one gateway.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// Subscribes: a burst of this many, then `subscribes_per_second`.
    pub subscribe_burst: u32,
    pub subscribes_per_second: u32,
    /// Events replayed on subscribes with `since`, per minute.
    pub recoveries_per_minute: u32,
}

/// The open sockets, shared by the upgrade handler, the hub, the sweep and every
/// socket's [`Ticket`] (one pointer each).
#[derive(Debug, Clone)]
pub struct Sessions(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    table: Mutex<Table>,
    per_user: usize,
    per_ip: usize,
    budgets: Budgets,
}

#[derive(Debug, Default)]
struct Table {
    users: HashMap<UserId, User>,
    addresses: HashMap<ClientIp, usize>,
}

/// One user's sockets and budgets.
#[derive(Debug)]
struct User {
    live: Vec<Live>,
    subscribes: Bucket,
    recoveries: Bucket,
}

impl User {
    fn new(budgets: Budgets) -> Self {
        Self {
            // Most users have one socket on a gateway: room for one, not the four a
            // first push would make.
            live: Vec::with_capacity(1),
            subscribes: Bucket::new(
                budgets.subscribe_burst,
                f64::from(budgets.subscribes_per_second),
            ),
            recoveries: Bucket::new(
                budgets.recoveries_per_minute,
                f64::from(budgets.recoveries_per_minute) / 60.0,
            ),
        }
    }
}

#[derive(Debug)]
struct Live {
    conn: ConnId,
    session: SessionId,
    evict: Evict,
}

impl Sessions {
    /// `per_ip` 0 means no cap per address.
    pub fn new(per_user: usize, per_ip: usize, budgets: Budgets) -> Self {
        Self(Arc::new(Shared {
            table: Mutex::default(),
            per_user,
            per_ip,
            budgets,
        }))
    }

    /// Takes one subscribe from `user`'s budget; else how long until there is one.
    pub fn take_subscribe(&self, user: UserId) -> Result<(), Duration> {
        let budgets = self.0.budgets;
        let mut table = self.table();
        let user = table
            .users
            .entry(user)
            .or_insert_with(|| User::new(budgets));
        user.subscribes.take(1)
    }

    /// Takes `events` replayed events from `user`'s budget; else how long until there
    /// are that many (`Duration::MAX`: never, more than the budget).
    pub fn take_recovery(&self, user: UserId, events: u32) -> Result<(), Duration> {
        let budgets = self.0.budgets;
        let mut table = self.table();
        let user = table
            .users
            .entry(user)
            .or_insert_with(|| User::new(budgets));
        user.recoveries.take(events)
    }

    /// Forgets users without sockets whose budgets are whole again.
    pub fn prune(&self) {
        let mut table = self.table();
        table.users.retain(|_, user| {
            !(user.live.is_empty() && user.subscribes.is_full() && user.recoveries.is_full())
        });
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.0.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a socket from `address`, if the address has room.
    pub fn admit_address(&self, address: ClientIp) -> Result<AddressTicket, Refusal> {
        if self.0.per_ip == 0 {
            return Ok(AddressTicket(None));
        }
        let mut table = self.table();
        let count = table.addresses.entry(address).or_default();
        if *count >= self.0.per_ip {
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
        let budgets = self.0.budgets;
        let mut table = self.table();
        let live = &mut table
            .users
            .entry(user)
            .or_insert_with(|| User::new(budgets))
            .live;
        if live.len() >= self.0.per_user {
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
            .flat_map(|user| &user.live)
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
            .flat_map(|user| &user.live)
            .map(|live| live.session)
            .collect();
        sessions.into_iter().collect()
    }

    /// Closes every socket of the sessions in `ended`; returns how many.
    pub fn revoke_sessions(&self, ended: &HashSet<SessionId>) -> usize {
        let table = self.table();
        let mut count = 0;
        for live in table.users.values().flat_map(|user| &user.live) {
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
            .and_then(|user| user.live.iter_mut().find(|live| live.conn == self.conn))
        {
            live.session = session;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // The user's entry stays (its budgets with it) until [`Sessions::prune`].
        let mut table = self.sessions.table();
        if let Some(user) = table.users.get_mut(&self.user) {
            user.live.retain(|live| live.conn != self.conn);
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
/// has live (a failed check is retried at the next interval), and forgets users who
/// left a while ago.
pub async fn sweep(sessions: Sessions, db: Db, interval: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        sessions.prune();
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

    const BUDGETS: Budgets = Budgets {
        subscribe_burst: 3,
        subscribes_per_second: 1,
        recoveries_per_minute: 60,
    };

    #[test]
    fn caps_per_user_and_per_address_free_their_places_on_drop() {
        let sessions = Sessions::new(2, 1, BUDGETS);
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
        let open = Sessions::new(1, 0, BUDGETS);
        let tickets: Vec<_> = (0..100)
            .map(|_| open.admit_address(address).unwrap())
            .collect();
        assert_eq!(tickets.len(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn budgets_are_the_users_and_outlive_a_reconnect() {
        let sessions = Sessions::new(10, 0, BUDGETS);
        let ann = UserId::new();
        let first = sessions
            .admit(ann, SessionId::new(), 1, Evict::default())
            .unwrap();
        for _ in 0..3 {
            sessions.take_subscribe(ann).unwrap();
        }
        sessions.take_recovery(ann, 60).unwrap();
        // Reconnecting: a new socket finds the budgets spent.
        drop(first);
        sessions.prune();
        let _second = sessions
            .admit(ann, SessionId::new(), 2, Evict::default())
            .unwrap();
        assert!(sessions.take_subscribe(ann).is_err());
        assert!(sessions.take_recovery(ann, 1).is_err());
        // Another user has their own.
        assert!(sessions.take_subscribe(UserId::new()).is_ok());
        // Gone and refilled: forgotten.
        let bob = UserId::new();
        sessions.take_subscribe(bob).unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        sessions.prune();
        assert!(!sessions.table().users.contains_key(&bob));
        assert!(
            sessions.table().users.contains_key(&ann),
            "ann has a socket"
        );
    }

    #[test]
    fn a_revocation_closes_exactly_the_sockets_of_the_sessions_it_ends() {
        let sessions = Sessions::new(10, 0, BUDGETS);
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
