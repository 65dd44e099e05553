//! Authorization by the node's compiled rules. The decision itself is
//! [`nodegate_crds::decision`] (shared with the operator, whose RBAC must answer as it does);
//! this module adds what only the agent needs: the kubelet's 403 body.

use nodegate_crds::Endpoint;
use nodegate_crds::attributes::RequestAttributes;
pub use nodegate_crds::decision::*;

/// The kubelet's 403 body; for the node's other components (no kubelet subresource), the
/// endpoint and path instead.
pub fn forbidden_body(user: &str, attrs: &RequestAttributes) -> String {
    let verb = attrs.verb.map_or("", |v| v.as_str());
    if attrs
        .path
        .starts_with(nodegate_crds::catalogue::COMPONENT_PREFIX)
    {
        let endpoint = endpoint_of(attrs).map_or("none", |e| e.name());
        return format!(
            "Forbidden (user={user}, verb={verb}, endpoint={endpoint}, path={})\n",
            attrs.path
        );
    }
    let subresources: Vec<&str> = attrs.subresources.iter().map(|s| s.as_str()).collect();
    format!(
        "Forbidden (user={user}, verb={verb}, resource=nodes, subresource(s)=[{}])\n",
        subresources.join(" ")
    )
}

/// The endpoint of a request, if any route matched.
pub fn endpoint_of(attrs: &RequestAttributes) -> Option<Endpoint> {
    attrs.route.as_ref().map(|r| r.endpoint)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nodegate_crds::attributes::request_attributes;

    #[test]
    fn forbidden_body_is_the_kubelets() {
        let a = request_attributes("GET", "/pods", None).unwrap();
        assert_eq!(
            forbidden_body("bob", &a),
            "Forbidden (user=bob, verb=get, resource=nodes, subresource(s)=[pods proxy])\n"
        );
    }
}
