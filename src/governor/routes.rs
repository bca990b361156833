//! Routes the platform limits below the token's budget (`[[upstream.route_limit]]`): some
//! resources have limits of their own (Genesys: 100 a minute on
//! `PUT /api/v2/architect/ivrs/{id}`), which a burst inside the token's budget still meets.
//! Each configured route gets a governor of its own, with the same fair queueing by
//! `share` and the same `429 rate_limited` when a call cannot fit in time; a call on such
//! a route is admitted by its route's governor first, then by the token budget's.

use std::sync::Arc;

use http::Method;

use super::gate::Governor;
use crate::config::{RouteLimit, UpstreamConfig};

/// One route's limit and the governor that holds calls to it.
#[derive(Debug)]
pub struct RouteBudget {
    pub limit: RouteLimit,
    pub governor: Arc<Governor>,
}

/// An upstream's route budgets.
#[derive(Debug, Default, Clone)]
pub struct RouteBudgets(Arc<[Arc<RouteBudget>]>);

impl RouteBudgets {
    /// `config`'s routes; a route whose rule and rate are unchanged from `previous` (the
    /// upstream a reload replaces) keeps its governor, and so its window.
    pub fn for_upstream(config: &UpstreamConfig, previous: Option<&RouteBudgets>) -> RouteBudgets {
        let budgets = config
            .route_limits
            .iter()
            .map(|limit| {
                let kept = previous.and_then(|p| {
                    p.0.iter()
                        .find(|b| b.limit.route == limit.route && b.limit.rate == limit.rate)
                });
                match kept {
                    Some(b) => Arc::clone(b),
                    None => Arc::new(RouteBudget {
                        limit: limit.clone(),
                        governor: Governor::with(
                            Some(limit.rate),
                            config.rate_limit_max_wait,
                            1,
                            None,
                        ),
                    }),
                }
            })
            .collect();
        RouteBudgets(budgets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first route whose rule matches `method` on `path` (within the upstream).
    pub fn matching(&self, method: &Method, path: &str) -> Option<&Arc<RouteBudget>> {
        self.0.iter().find(|b| b.limit.rule.allows(method, path))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<RouteBudget>> {
        self.0.iter()
    }
}
