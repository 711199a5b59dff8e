//! From a GCE instance to the mesh identity it should hold. Rules are tried in order;
//! the first whose every given field matches wins. Patterns allow `*` wildcards.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One rule, as written in the configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Project id pattern.
    #[serde(default)]
    pub project: Option<String>,
    /// Zone pattern.
    #[serde(default)]
    pub zone: Option<String>,
    /// Instance name pattern.
    #[serde(default)]
    pub instance_name: Option<String>,
    /// Instance service-account email pattern.
    #[serde(default)]
    pub service_account_email: Option<String>,
    /// Labels that must be present with these values (needs the Compute cross-check,
    /// which is where labels come from).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Mesh namespace granted.
    pub namespace: String,
    /// Mesh service account granted.
    pub service_account: String,
}

/// A grant for the standard-format tokens of one Google service account
/// (`[[service_account_token]]`): what the old node agents send. Such a token names the
/// service account (`sub`, its unique id) and nothing of the project or the instance,
/// so the grant is for every VM, in any project, that runs as that service account.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountToken {
    /// The Google service account's unique id (the token's `sub`): digits, exactly.
    pub unique_id: String,
    /// Mesh namespace granted.
    pub namespace: String,
    /// Mesh service account granted.
    pub service_account: String,
}

/// What is known about the instance when mapping.
#[derive(Debug, Default)]
pub struct InstanceFacts<'a> {
    /// Project id.
    pub project: &'a str,
    /// Zone.
    pub zone: &'a str,
    /// Instance name.
    pub instance_name: &'a str,
    /// Service-account email from the token.
    pub service_account_email: Option<&'a str>,
    /// Labels from the Compute API (None without the cross-check).
    pub labels: Option<&'a BTreeMap<String, String>>,
}

/// `*` matches any run of characters; everything else literally.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl Rule {
    /// Whether every field the rule names matches.
    pub fn matches(&self, f: &InstanceFacts<'_>) -> bool {
        let field = |p: &Option<String>, v: Option<&str>| {
            p.as_ref().is_none_or(|p| v.is_some_and(|v| glob(p, v)))
        };
        field(&self.project, Some(f.project))
            && field(&self.zone, Some(f.zone))
            && field(&self.instance_name, Some(f.instance_name))
            && field(&self.service_account_email, f.service_account_email)
            && (self.labels.is_empty()
                || f.labels
                    .is_some_and(|l| self.labels.iter().all(|(k, v)| l.get(k) == Some(v))))
    }
}

/// The first matching rule.
pub fn first_match<'r>(rules: &'r [Rule], f: &InstanceFacts<'_>) -> Option<&'r Rule> {
    rules.iter().find(|r| r.matches(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globbing() {
        assert!(glob("mysql-*", "mysql-1"));
        assert!(glob("*", ""));
        assert!(glob("us-central1-*", "us-central1-a"));
        assert!(glob("a*b*c", "a-x-b-y-c"));
        assert!(!glob("a*b*c", "a-x-c"));
        assert!(!glob("mysql-*", "postgres-1"));
        assert!(glob("exact", "exact") && !glob("exact", "exactly"));
        assert!(!glob("ab*ba", "aba"), "prefix and suffix must not overlap");
    }

    #[test]
    fn first_matching_rule_wins_and_labels_need_the_api() {
        let rules: Vec<Rule> = toml::from_str::<BTreeMap<String, Vec<Rule>>>(
            r#"
            [[m]]
            project = "shop"
            instance_name = "mysql-*"
            labels = { role = "db" }
            namespace = "vm"
            service_account = "mysqldb"
            [[m]]
            project = "shop"
            namespace = "vm"
            service_account = "default"
            "#,
        )
        .unwrap()
        .remove("m")
        .unwrap();
        let labels: BTreeMap<String, String> = [("role".to_string(), "db".to_string())].into();
        let mut f = InstanceFacts {
            project: "shop",
            zone: "z",
            instance_name: "mysql-1",
            ..Default::default()
        };
        assert_eq!(
            first_match(&rules, &f).unwrap().service_account,
            "default",
            "no labels known: rule 1 cannot match"
        );
        f.labels = Some(&labels);
        assert_eq!(first_match(&rules, &f).unwrap().service_account, "mysqldb");
        f.project = "other";
        assert!(first_match(&rules, &f).is_none());
    }
}
