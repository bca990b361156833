//! Telling a dead token from a 401 it did not cause.
//!
//! The platform answers 401 when a token is revoked, expired early or rotated — and also,
//! now and then, for a good token (a data action whose remote refuses, a caller provoking
//! 401s on purpose). Replacing the token on every 401 lets one caller make the proxy mint
//! a token per call, and spend the token endpoint's rate limit that every client shares;
//! keeping a token because it is young keeps a dead one after a second revocation.
//!
//! So a rejected token that is still the current one is judged first: the platform is asked
//! about the token itself (Genesys `HEAD /api/v2/tokens/me`), and only a token it calls
//! dead is replaced. An answer counts for the 401s that arrived before it was *sent*: a
//! token alive a second ago may be revoked now. Where nothing can be asked (or the question
//! goes unanswered), replacements are bounded by a budget — a burst of
//! [`REPLACEMENT_BURST`], then one per [`REPLACEMENT_EVERY`] — never a lock-out.

use std::time::Duration;

use futures_util::future::BoxFuture;
use http::HeaderValue;
use tokio::time::Instant;

/// What the platform said of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// It still accepts the token: the 401 was about the call, not the token.
    Alive,
    /// It does not: replace the token.
    Dead,
    /// No answer that says either (a 429, a 5xx, a timeout, a failed connection).
    Unknown,
}

/// Asks the platform about the token in a `Bearer …` header.
pub type Check = Box<dyn FnOnce(HeaderValue) -> BoxFuture<'static, Liveness> + Send>;

/// What becomes of a 401.
#[derive(Debug)]
pub enum Rejection<T> {
    /// The token the call carried was replaced (or already had been): send it again.
    Replaced(T),
    /// The token is still good (or may not be replaced yet): the 401 goes to the caller.
    Stands,
}

/// Replacements without an answer from the platform: this many at once...
pub const REPLACEMENT_BURST: f64 = 3.0;
/// ...then one per this long.
pub const REPLACEMENT_EVERY: Duration = Duration::from_secs(2);
/// Questions to the platform: this many at once, then one per [`CHECK_EVERY`]. Each is a
/// call in the token's rate budget; a storm of 401s must not spend it (past the budget,
/// the next question waits, and the 401s that come meanwhile share its answer).
const CHECK_BURST: f64 = 5.0;
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A question unanswered within this long is [`Liveness::Unknown`].
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A token bucket: `burst` at once, refilled one per `every`.
#[derive(Debug)]
struct Bucket {
    level: f64,
    at: Option<Instant>,
    burst: f64,
    every: Duration,
}

impl Bucket {
    const fn new(burst: f64, every: Duration) -> Bucket {
        Bucket {
            level: burst,
            at: None,
            burst,
            every,
        }
    }

    /// How long until one is there.
    fn until_one(&self, now: Instant) -> Duration {
        let since = self
            .at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        let level = self.level + since.as_secs_f64() / self.every.as_secs_f64();
        self.every.mul_f64((1.0 - level).max(0.0))
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() / self.every.as_secs_f64();
            self.level = (self.level + refill).min(self.burst);
        }
        self.at = Some(now);
        if self.level >= 1.0 {
            self.level -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The last answer about a token.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    generation: u64,
    /// When the question was sent: it speaks for 401s that arrived before then.
    asked: Instant,
    alive: bool,
}

/// One token source's judgements of rejected tokens; kept across grants.
#[derive(Debug)]
pub struct Judge {
    verdict: Option<Verdict>,
    checks: Bucket,
    replacements: Bucket,
}

impl Default for Judge {
    fn default() -> Self {
        Judge {
            verdict: None,
            checks: Bucket::new(CHECK_BURST, CHECK_EVERY),
            replacements: Bucket::new(REPLACEMENT_BURST, REPLACEMENT_EVERY),
        }
    }
}

impl Judge {
    /// Should the current token, `generation`, which the platform answered with 401 at
    /// `seen_at`, be replaced? `check` asks the platform, where it can be asked.
    pub async fn should_replace(
        &mut self,
        generation: u64,
        header: &HeaderValue,
        seen_at: Instant,
        check: Option<Check>,
    ) -> bool {
        let known = self.verdict.filter(|v| v.generation == generation);
        match known {
            // Dead stays dead.
            Some(v) if !v.alive => return true,
            // Asked after this 401 arrived, and alive: the 401 was about the call.
            Some(v) if v.asked >= seen_at => return false,
            _ => {}
        }
        let liveness = match check {
            Some(check) => {
                // Past the questions' budget, wait for the next one: every 401 that came
                // meanwhile shares its answer (the single flight holds them), and a real
                // revocation in a storm of 401s is recovered within a second.
                if !self.checks.take(Instant::now()) {
                    tokio::time::sleep(self.checks.until_one(Instant::now())).await;
                    self.checks.take(Instant::now());
                }
                let asked = Instant::now();
                let liveness = tokio::time::timeout(CHECK_TIMEOUT, check(header.clone()))
                    .await
                    .unwrap_or(Liveness::Unknown);
                if liveness != Liveness::Unknown {
                    self.verdict = Some(Verdict {
                        generation,
                        asked,
                        alive: liveness == Liveness::Alive,
                    });
                }
                liveness
            }
            None => Liveness::Unknown,
        };
        match liveness {
            Liveness::Alive => false,
            Liveness::Dead => true,
            Liveness::Unknown => self.replacements.take(Instant::now()),
        }
    }
}

/// RFC 7662 token introspection at `url`, authenticated as the grant is
/// (`client_secret_basic` or `client_secret_post`): `{"active": true}` is alive, `false`
/// dead, anything else unknown. Only for clients with a shared secret.
pub fn introspection(grant: &crate::config::GrantConfig, url: &str) -> Option<Check> {
    use crate::config::{AuthMethod, BasicEncoding};
    use secrecy::ExposeSecret;
    let secret = grant
        .client_secret
        .as_ref()?
        .value
        .expose_secret()
        .to_string();
    let client = grant.http.clone();
    let (url, id) = (url.to_string(), grant.client_id.clone());
    let (post, form_encoded) = (
        grant.auth_method == AuthMethod::Post,
        grant.basic_encoding == BasicEncoding::FormEncoded,
    );
    Some(Box::new(move |header: HeaderValue| {
        Box::pin(async move {
            let Some(token) = header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")) else {
                return Liveness::Unknown;
            };
            let mut form = vec![
                ("token", token.to_string()),
                ("token_type_hint", "access_token".into()),
            ];
            let ask = if post {
                form.push(("client_id", id));
                form.push(("client_secret", secret));
                client.post(&url)
            } else if form_encoded {
                let enc =
                    |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                client.post(&url).basic_auth(enc(&id), Some(enc(&secret)))
            } else {
                client.post(&url).basic_auth(id, Some(secret))
            };
            let Ok(answer) = ask.form(&form).send().await else {
                return Liveness::Unknown;
            };
            if !answer.status().is_success() {
                return Liveness::Unknown;
            }
            match answer
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["active"].as_bool())
            {
                Some(true) => Liveness::Alive,
                Some(false) => Liveness::Dead,
                None => Liveness::Unknown,
            }
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answering(
        liveness: Liveness,
        asked: &std::sync::Arc<std::sync::atomic::AtomicU32>,
    ) -> Check {
        let asked = std::sync::Arc::clone(asked);
        Box::new(move |_| {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move { liveness })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_question_replacements_come_three_at_once_then_one_per_two_seconds() {
        let mut judge = Judge::default();
        let h = HeaderValue::from_static("Bearer t");
        let mut replaced = 0;
        for _ in 0..10 {
            replaced += judge.should_replace(1, &h, Instant::now(), None).await as u32;
        }
        assert_eq!(replaced, 3);
        tokio::time::advance(Duration::from_millis(1990)).await;
        assert!(!judge.should_replace(1, &h, Instant::now(), None).await);
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(judge.should_replace(1, &h, Instant::now(), None).await);
        assert!(!judge.should_replace(1, &h, Instant::now(), None).await);
    }

    #[tokio::test(start_paused = true)]
    async fn an_alive_answer_covers_only_the_401s_that_came_before_it_was_asked() {
        let mut judge = Judge::default();
        let h = HeaderValue::from_static("Bearer t");
        let asked = std::sync::Arc::default();
        let seen = Instant::now();
        assert!(
            !judge
                .should_replace(1, &h, seen, Some(answering(Liveness::Alive, &asked)))
                .await
        );
        // A 401 from before the question: no new question.
        assert!(
            !judge
                .should_replace(1, &h, seen, Some(answering(Liveness::Dead, &asked)))
                .await
        );
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A 401 from after it: asked again, and now the token is dead (revoked meanwhile).
        tokio::time::advance(Duration::from_millis(300)).await;
        let later = Instant::now();
        assert!(
            judge
                .should_replace(1, &h, later, Some(answering(Liveness::Dead, &asked)))
                .await
        );
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Dead stays dead without asking.
        assert!(
            judge
                .should_replace(1, &h, later, Some(answering(Liveness::Alive, &asked)))
                .await
        );
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_of_401s_asks_five_questions_at_once_then_one_a_second() {
        let mut judge = Judge::default();
        let h = HeaderValue::from_static("Bearer t");
        let asked = std::sync::Arc::default();
        let started = Instant::now();
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(1)).await;
            let seen = Instant::now();
            let replace = judge
                .should_replace(1, &h, seen, Some(answering(Liveness::Alive, &asked)))
                .await;
            assert!(!replace, "an alive token is never replaced");
        }
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 20);
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(15), "{took:?}");
        assert!(took < Duration::from_secs(17), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_question_falls_back_to_the_replacement_budget() {
        let mut judge = Judge::default();
        let h = HeaderValue::from_static("Bearer t");
        let asked = std::sync::Arc::default();
        let mut replaced = 0;
        for _ in 0..5 {
            let unknown = answering(Liveness::Unknown, &asked);
            replaced += judge
                .should_replace(1, &h, Instant::now(), Some(unknown))
                .await as u32;
        }
        assert_eq!(replaced, 3);
    }
}
