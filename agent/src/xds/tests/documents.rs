//! Text documents (file and REST sources) as Envoy reads dynamic configuration:
//! a document with nothing in it is refused (Envoy: "Unable to convert YAML as
//! JSON", `MessageUtil::loadFromYaml`), never read as "remove everything"; a field
//! sockmesh does not know is ignored and counted (Envoy's dynamic validation
//! visitor); every error names where it is.

use crate::xds::{
    decode::{DecodeError, Kind, discovery_document, discovery_response_with_opaque},
    filedoc::{Known, read},
    state::{Update, XdsState},
};

#[test]
fn a_content_free_document_is_refused_and_only_an_explicit_empty_list_removes_everything() {
    let spaces = " ".repeat(20 << 20);
    for (text, what) in [
        ("", "empty"),
        ("\n", "only whitespace"),
        ("   \t\n\n", "only whitespace"),
        (
            "# resources: []\n",
            "only YAML comments and document markers",
        ),
        ("---\n", "only YAML comments and document markers"),
        (
            "--- # nothing\n...\n",
            "only YAML comments and document markers",
        ),
        ("\u{feff}", "empty"),
        (spaces.as_str(), "only whitespace"),
    ] {
        let err = read(text, &Known::default()).expect_err("content-free");
        assert!(
            matches!(err, DecodeError::ContentFree(w) if w == what),
            "{:?}: {err}",
            &text[..text.len().min(20)]
        );
        assert!(err.to_string().contains("`resources: []` removes"), "{err}");
        // REST bodies too.
        assert!(discovery_response_with_opaque(text).is_err());
    }
    // A file without a `resources` list is refused; a REST response may omit an
    // empty list (proto3 JSON leaves empty lists out).
    for text in ["{}", "version_info: \"3\"\n", "{\"versionInfo\":\"3\"}"] {
        let err = read(text, &Known::default()).expect_err("no resources list");
        assert!(matches!(err, DecodeError::NoResources), "{text}: {err}");
        assert!(discovery_response_with_opaque(text).is_ok(), "{text}");
    }
    for text in [
        "resources: []\n",
        "{\"resources\": []}",
        "\u{feff}resources: []\n",
    ] {
        let r = read(text, &Known::default()).expect("an explicit empty list");
        assert!(r.changed.is_empty());
    }
    // A byte order mark before a document is skipped.
    let (resp, _) = discovery_document(
        "\u{feff}resources:\n- { \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: c }\n",
    )
    .expect("BOM skipped");
    assert_eq!(resp.resources.len(), 1);
}

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

#[test]
fn a_refused_resource_of_a_file_is_named_with_its_line_and_column() {
    let yaml = format!(
        "version_info: \"1\"\nresources:\n- {{ \"@type\": {CLUSTER}, name: a }}\n- \"@type\": {CLUSTER}\n  name: b\n  connect_timeout: 0s\n"
    );
    let json = format!(
        "{{\"versionInfo\":\"1\",\"resources\":[\n  {{\"@type\":\"{CLUSTER}\",\"name\":\"a\"}},\n  {{\"@type\":\"{CLUSTER}\",\"name\":\"b\",\"connectTimeout\":\"0s\"}}\n]}}"
    );
    for (text, at) in [(yaml, "line 4 column 1"), (json, "line 3 column 3")] {
        let r = read(&text, &Known::default()).expect("reads");
        let mut st = XdsState::new();
        let applied = st.apply(Update::Full {
            version: r.version,
            resources: r.changed,
            kept: r.kept,
            positions: r.positions,
        });
        assert_eq!(applied.refused.len(), 1);
        let error = &applied.refused[0].error;
        assert!(
            error.starts_with("Cluster \"b\": connect_timeout: 0s must be greater than 0")
                && error.ends_with(&format!("(resources[1] at {at})")),
            "{error}"
        );
        assert_eq!(st.resources().clusters.len(), 1, "a applied");
    }
}

#[test]
fn an_unknown_field_is_ignored_counted_and_the_resource_applied() {
    let text = format!(
        "resources:\n- {{ \"@type\": {CLUSTER}, name: a, shiny_new_knob: {{ x: 1 }}, load_assignment: {{ cluster_name: a, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 10.0.0.1, port_value: 80, future: true }} }} }} }} ] }} ] }} }}\n"
    );
    let r = read(&text, &Known::default()).expect("ignored, not refused");
    assert_eq!(r.changed.len(), 1);
    assert_eq!(
        r.notes.unknown_fields.keys().collect::<Vec<_>>(),
        [
            "envoy.config.cluster.v3.Cluster.shiny_new_knob",
            "envoy.config.core.v3.SocketAddress.future"
        ]
    );
}

#[test]
fn an_any_of_another_type_names_both_types() {
    let err = crate::xds::decode::decode_any(
        &sockmesh_proto::pb::google::protobuf::Any {
            type_url: String::new(),
            value: Vec::new(),
        },
        Kind::Cluster,
    )
    .expect_err("wrong type");
    assert_eq!(
        err.to_string(),
        "resource type \"\" is not the cds type \"type.googleapis.com/envoy.config.cluster.v3.Cluster\""
    );
}
