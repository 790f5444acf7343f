//! The Tasklist APIs the automatic probe knows (see [`super::probe`]).

use crate::crd::ProbeMethod;

/// The Tasklist APIs the automatic probe knows, in the order it tries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TasklistApi {
    /// `POST /v1/tasks/search`: Camunda up to 8.9 (8.8 and 8.9 with v1 still on).
    V1,
    /// `POST /v2/user-tasks/search`: the Orchestration Cluster API of 8.8+.
    V2,
}

impl TasklistApi {
    pub(crate) const ALL: [TasklistApi; 2] = [TasklistApi::V1, TasklistApi::V2];

    /// The authenticated search that proves the credential: (method, path, body).
    pub(crate) fn request(self) -> (ProbeMethod, &'static str, &'static str) {
        match self {
            TasklistApi::V1 => (ProbeMethod::Post, "/v1/tasks/search", r#"{"pageSize":1}"#),
            TasklistApi::V2 => (ProbeMethod::Post, "/v2/user-tasks/search", r#"{"page":{"limit":1}}"#),
        }
    }

    pub(crate) fn other(self) -> TasklistApi {
        match self {
            TasklistApi::V1 => TasklistApi::V2,
            TasklistApi::V2 => TasklistApi::V1,
        }
    }
}
