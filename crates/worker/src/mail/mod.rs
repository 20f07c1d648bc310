//! `mail.send`: one mail over SMTP (`mobile_db::email` says which mails there are).
//!
//! For a mail with a link, the token is made here, in a transaction that holds the
//! account against deletion, and committed before the mail leaves: the link in a mail
//! always names a token that exists. Only the token's hash is stored; the token itself
//! exists in this process's memory and in the mail. A send that fails deletes its
//! token, and the retry makes a new one.
//!
//! The connection is TLS, always: `smtp://` requires STARTTLS (a server that does not
//! offer it fails the send), `smtps://` speaks TLS from the first byte. The token rides
//! in the link's fragment (`#token=`). A 5xx answer
//! (an address the server refuses) is permanent; a 4xx, a timeout or a lost
//! connection is retried with the queue's backoff.
//!
//! Without `SMTP_URL` mail is off: the worker says so at start, and each `mail.send`
//! job completes without sending (`mails_total{outcome="disabled"}`).

pub mod templates;

use std::sync::Arc;

use lettre::{
    Address, AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor,
    message::{Mailbox, header::ContentType},
    transport::smtp::{
        authentication::Credentials,
        client::{Certificate, Tls, TlsParameters},
    },
};
use mobile_db::{
    Db,
    email::{self, Mail, MailJob, Purpose, Recipient},
    jobs::Job,
};
use mobile_domain::Email;

use crate::{
    metrics::WorkerMetrics,
    queue::{Done, Handler, JobError, JobFuture, Lease},
    settings::MailSettings,
};
use templates::Values;

/// Sends `mail.send` jobs, or drops them when mail is off.
#[derive(Clone)]
pub struct SendMail {
    pub db: Db,
    pub mailer: Option<Arc<Mailer>>,
    pub metrics: WorkerMetrics,
}

impl std::fmt::Debug for SendMail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendMail")
            .field("enabled", &self.mailer.is_some())
            .finish_non_exhaustive()
    }
}

/// What became of a mail that did not fail.
enum Outcome {
    Sent {
        language: &'static str,
    },
    /// Nothing to send, and why.
    Skipped(&'static str),
}

impl Handler for SendMail {
    fn run(&self, job: Job, _lease: Lease) -> JobFuture {
        let this = self.clone();
        Box::pin(async move {
            let MailJob { mail, languages } = job.payload().map_err(JobError::permanent)?;
            let template = mail.template();
            let Some(mailer) = &this.mailer else {
                this.metrics.mail(template, "disabled");
                tracing::warn!(template, "mail is off (no SMTP_URL): not sent");
                return Ok(Done::Complete);
            };
            match mailer.send(&this.db, &mail, &languages).await {
                Ok(Outcome::Sent { language }) => {
                    this.metrics.mail(template, "sent");
                    tracing::info!(template, language, "mail sent");
                    Ok(Done::Complete)
                }
                Ok(Outcome::Skipped(reason)) => {
                    this.metrics.mail(template, "skipped");
                    tracing::info!(template, reason, "mail not needed");
                    Ok(Done::Complete)
                }
                Err(error) => {
                    this.metrics.mail(template, "failed");
                    Err(error)
                }
            }
        })
    }
}

/// An SMTP relay, the sender, and what the mails say.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    settings: MailSettings,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("smtp", &self.settings.smtp)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Mailer {
    pub fn new(settings: MailSettings, timeout: std::time::Duration) -> anyhow::Result<Self> {
        let smtp = &settings.smtp;
        let mut tls = TlsParameters::builder(smtp.host.clone());
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("SMTP_CA_FILE: cannot read {}: {e}", path.display())
            })?;
            tls = tls.add_root_certificate(
                Certificate::from_pem(&pem)
                    .map_err(|e| anyhow::anyhow!("SMTP_CA_FILE: not a PEM certificate: {e}"))?,
            );
        }
        let tls = tls.build_rustls()?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host)
            .port(smtp.port)
            .tls(if smtp.implicit_tls {
                Tls::Wrapper(tls)
            } else {
                Tls::Required(tls)
            })
            .timeout(Some(timeout));
        if let (Some(user), Some(password)) = (&smtp.username, &smtp.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        let from = settings
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("MAIL_FROM: {e}"))?;
        Ok(Self {
            transport: builder.build(),
            from,
            settings,
        })
    }

    /// Where mail goes, for the log at start.
    pub fn describe(&self) -> String {
        let smtp = &self.settings.smtp;
        let tls = if smtp.implicit_tls { "TLS" } else { "STARTTLS" };
        format!("{}:{} ({tls})", smtp.host, smtp.port)
    }

    async fn send(&self, db: &Db, mail: &Mail, languages: &[String]) -> Result<Outcome, JobError> {
        let mut tx = db.begin().await?;
        let (recipient, link) = match mail {
            Mail::VerifyEmail { user_id, email } => {
                let Some(recipient) = email::recipient_by_id(&mut *tx, *user_id).await? else {
                    return Ok(Outcome::Skipped("the account is gone"));
                };
                if recipient.email == *email && recipient.email_verified {
                    return Ok(Outcome::Skipped("the address is verified already"));
                }
                let ttl = self.settings.verification_ttl;
                let token =
                    email::create_token(&mut tx, *user_id, Purpose::VerifyEmail, email, span(ttl))
                        .await?;
                (recipient, Some(("verify-email", token, ttl)))
            }
            Mail::ResetPassword { email } => {
                let address =
                    Email::parse(email).map_err(|e| JobError::permanent(e.to_string()))?;
                let Some(recipient) = email::recipient_by_email(&mut *tx, &address).await? else {
                    return Ok(Outcome::Skipped("no account has the address"));
                };
                let ttl = self.settings.reset_ttl;
                let token = email::create_token(
                    &mut tx,
                    recipient.user_id,
                    Purpose::ResetPassword,
                    email,
                    span(ttl),
                )
                .await?;
                (recipient, Some(("reset-password", token, ttl)))
            }
            Mail::EmailChangeRequested { user_id, email, .. } => {
                let Some(recipient) = email::recipient_by_id(&mut *tx, *user_id).await? else {
                    return Ok(Outcome::Skipped("the account is gone"));
                };
                // The way back for the owner, if it was not them: this address again.
                let ttl = self.settings.restore_ttl;
                let token =
                    email::create_token(&mut tx, *user_id, Purpose::RestoreEmail, email, span(ttl))
                        .await?;
                (recipient, Some(("restore-email", token, ttl)))
            }
        };
        tx.commit().await?;

        // Until the server took the mail, its link must not work: the guard deletes the
        // token on a failed send, and also when the attempt is cancelled (its timeout,
        // shutdown) before it returns.
        let guard = link
            .as_ref()
            .map(|(_, token, _)| UnsentToken::new(db.clone(), token.clone()));
        let result = self.deliver(mail, languages, &recipient, link).await;
        if let Some(guard) = guard {
            match &result {
                Ok(_) => guard.sent(),
                Err(_) => guard.delete().await,
            }
        }
        result
    }

    async fn deliver(
        &self,
        mail: &Mail,
        languages: &[String],
        recipient: &Recipient,
        link: Option<(&str, String, std::time::Duration)>,
    ) -> Result<Outcome, JobError> {
        let language = templates::pick(
            languages
                .iter()
                .map(String::as_str)
                .chain(recipient.device_locale.as_deref()),
        );
        // The token in the fragment: a browser that opens the link (no app installed)
        // never sends it to a server, so no access log or Referer carries it.
        let url = link.as_ref().map(|(path, token, _)| {
            format!(
                "{}/{path}#token={token}",
                self.settings.link_base.as_str().trim_end_matches('/')
            )
        });
        let rendered = language
            .render(
                mail,
                &Values {
                    app_name: &self.settings.app_name,
                    link: url.as_deref(),
                    valid_for: link.map(|(_, _, ttl)| ttl),
                },
            )
            .map_err(JobError::permanent)?;
        // A bare address, never `Name <address>`: the mail goes to exactly the text the
        // account holds.
        let to = plain_address(mail.to())?;
        if let Mail::EmailChangeRequested { new_email, .. } = mail {
            plain_address(new_email)?;
        }
        let message = Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to))
            .subject(rendered.subject)
            .header(ContentType::TEXT_PLAIN)
            .body(rendered.body)
            .map_err(|e| JobError::permanent(format!("the mail cannot be built: {e}")))?;
        match self.transport.send(message).await {
            Ok(_) => Ok(Outcome::Sent {
                language: language.tag,
            }),
            Err(e) if e.is_permanent() => Err(JobError::permanent(format!(
                "the SMTP server refused the mail: {e}"
            ))),
            Err(e) => Err(JobError::transient(format!("SMTP: {e}"))),
        }
    }
}

/// `text` as an address a mail can go to, exactly as written.
fn plain_address(text: &str) -> Result<Address, JobError> {
    text.parse::<Address>()
        .ok()
        .filter(|address| AsRef::<str>::as_ref(address) == text)
        .ok_or_else(|| JobError::permanent(format!("{text:?} is not an address a mail can go to")))
}

/// The token of a mail not known to be sent; deleted unless [`UnsentToken::sent`].
struct UnsentToken {
    db: Db,
    token: Option<String>,
}

impl UnsentToken {
    fn new(db: Db, token: String) -> Self {
        Self {
            db,
            token: Some(token),
        }
    }

    fn sent(mut self) {
        self.token = None;
    }

    async fn delete(mut self) {
        if let Some(token) = self.token.take() {
            delete_unsent(&self.db, &token).await;
        }
    }
}

impl Drop for UnsentToken {
    fn drop(&mut self) {
        // Dropped mid-send: the attempt was cancelled. Delete the token from a task of
        // its own, since a destructor cannot wait.
        if let Some(token) = self.token.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let db = self.db.clone();
            runtime.spawn(async move { delete_unsent(&db, &token).await });
        }
    }
}

/// Should this fail too, the token expires unused.
async fn delete_unsent(db: &Db, token: &str) {
    if let Err(e) = email::delete_token(db, token).await {
        tracing::warn!(error = %e, "could not delete the token of an unsent mail");
    }
}

fn span(duration: std::time::Duration) -> time::Duration {
    time::Duration::try_from(duration).unwrap_or(time::Duration::DAY)
}
