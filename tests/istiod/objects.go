package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kubefake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"sigs.k8s.io/yaml"

	"istio.io/istio/pilot/pkg/config/kube/crd"
	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pkg/config"
	"istio.io/istio/pkg/config/schema/collections"
	"istio.io/istio/pkg/config/schema/gvk"
	istiogvr "istio.io/istio/pkg/config/schema/gvr"
	"istio.io/istio/pkg/config/schema/resource"
	kubelib "istio.io/istio/pkg/kube"
)

// badInput marks errors caused by the request body (HTTP 400), notFound a
// delete of something that is not there (404). Other errors come from the
// stores; Kubernetes ones carry their own status.
type (
	badInput struct{ error }
	notFound struct{ error }
)

func badInputf(format string, a ...any) error { return badInput{fmt.Errorf(format, a...)} }

// splitYAML returns the non-empty documents of a multi-document YAML (or
// JSON) stream. A document holding only comments counts as empty.
func splitYAML(data []byte) ([][]byte, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var docs [][]byte
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, badInputf("document %d: %v", i, err)
		}
		var m map[string]any
		if err := yaml.Unmarshal(doc, &m); err != nil {
			return nil, badInputf("document %d: %v", i, err)
		}
		if len(m) > 0 {
			docs = append(docs, doc)
		}
	}
}

// readPaths concatenates the YAML files named by paths: a file, or a
// directory whose *.yaml / *.yml files are read in name order.
func readPaths(paths []string) (string, error) {
	var out []string
	for _, p := range paths {
		files := []string{p}
		if st, err := os.Stat(p); err != nil {
			return "", err
		} else if st.IsDir() {
			files = nil
			for _, pattern := range []string{"*.yaml", "*.yml"} {
				m, _ := filepath.Glob(filepath.Join(p, pattern))
				files = append(files, m...)
			}
			sort.Strings(files)
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				return "", err
			}
			out = append(out, string(b))
		}
	}
	// "\n---\n" keeps a file without a trailing newline from merging into the next.
	return strings.Join(out, "\n---\n"), nil
}

// ref names an object in responses: Kind/namespace/name, or Kind/name when
// cluster-scoped.
func ref(kind, namespace, name string) string {
	if namespace == "" {
		return kind + "/" + name
	}
	return kind + "/" + namespace + "/" + name
}

// docMeta is what a delete needs from a document: apiVersion, kind, metadata.
func docMeta(doc []byte) (schema.GroupVersionKind, metav1.ObjectMeta, error) {
	var m metav1.PartialObjectMetadata
	if err := yaml.Unmarshal(doc, &m); err != nil {
		return schema.GroupVersionKind{}, m.ObjectMeta, badInputf("%v", err)
	}
	g := m.GroupVersionKind()
	if g.Kind == "" || g.Version == "" || m.Name == "" {
		return g, m.ObjectMeta, badInputf("document needs apiVersion, kind and metadata.name")
	}
	return g, m.ObjectMeta, nil
}

// ---- Kubernetes objects -------------------------------------------------

// kubeObject is one Kubernetes object from a request, with the resource the
// fake clientset files it under.
type kubeObject struct {
	obj  runtime.Object
	meta metav1.Object
	gvr  schema.GroupVersionResource
	ref  string
}

// kubeResource maps a kind to its resource. Only plain Kubernetes API
// groups are accepted: Istio config lives in the config store, not in the
// fake clientset (see /config/apply).
func kubeResource(k schema.GroupVersionKind) (schema.GroupVersionResource, error) {
	if strings.HasSuffix(k.Group, "istio.io") {
		return schema.GroupVersionResource{}, badInputf("%s is Istio config: use /config/apply or /config/delete", k.Kind)
	}
	// The fake keeps these groups in clientsets of their own, which this
	// program does not write to.
	if strings.HasPrefix(k.Group, "gateway.networking.") || strings.HasPrefix(k.Group, "inference.networking.") {
		return schema.GroupVersionResource{}, badInputf("%s (%s) is not supported here", k.Kind, k.GroupVersion())
	}
	if r, ok := gvk.ToGVR(config.FromKubernetesGVK(k)); ok {
		return r, nil
	}
	r, _ := meta.UnsafeGuessKindToResource(k)
	return r, nil
}

// namespaceOf defaults a namespaced object's namespace to "default", as
// kubectl does.
func namespaceOf(r schema.GroupVersionResource, ns string) string {
	if ns == "" && !istiogvr.IsClusterScoped(r) {
		return "default"
	}
	return ns
}

// parseKube decodes every document into its typed Kubernetes object, with
// the same scheme istiod's kube client uses. Nothing is written.
func parseKube(data []byte) ([]kubeObject, error) {
	docs, err := splitYAML(data)
	if err != nil {
		return nil, err
	}
	decode := kubelib.IstioCodec.UniversalDeserializer().Decode
	out := make([]kubeObject, 0, len(docs))
	for i, doc := range docs {
		obj, k, err := decode(doc, nil, nil)
		if err != nil {
			return nil, badInputf("document %d: %v", i, err)
		}
		gvr, err := kubeResource(*k)
		if err != nil {
			return nil, badInputf("document %d: %v", i, err)
		}
		m, err := meta.Accessor(obj)
		if err != nil || m.GetName() == "" {
			return nil, badInputf("document %d: %s without metadata.name", i, k.Kind)
		}
		m.SetNamespace(namespaceOf(gvr, m.GetNamespace()))
		out = append(out, kubeObject{obj: obj, meta: m, gvr: gvr, ref: ref(k.Kind, m.GetNamespace(), m.GetName())})
	}
	return out, nil
}

// stampNew fills in what the API server sets on create, so objects look as
// they would in a cluster (istiod orders Services by creation time).
func stampNew(m metav1.Object) {
	if ts := m.GetCreationTimestamp(); ts.IsZero() {
		m.SetCreationTimestamp(metav1.Now())
	}
	if m.GetUID() == "" {
		m.SetUID(types.UID(uuid.NewString()))
	}
}

// kubeStore writes through the fake clientset's reactor chain: Invokes is
// exactly what typed calls such as CoreV1().Pods(ns).Create run, so the
// object tracker emits the watch event that istiod's informers consume.
type kubeStore struct {
	cs *kubefake.Clientset
}

// apply creates each object, or replaces it if it exists (keeping its
// creation time and UID, as the API server does), in order.
func (s kubeStore) apply(objs []kubeObject) ([]string, error) {
	applied := make([]string, 0, len(objs))
	for _, o := range objs {
		ns := o.meta.GetNamespace()
		prev, err := s.cs.Tracker().Get(o.gvr, ns, o.meta.GetName())
		switch {
		case kerrors.IsNotFound(err):
			stampNew(o.meta)
			_, err = s.cs.Invokes(k8stesting.NewCreateAction(o.gvr, ns, o.obj), nil)
		case err == nil:
			pm, _ := meta.Accessor(prev)
			if ts := o.meta.GetCreationTimestamp(); ts.IsZero() {
				o.meta.SetCreationTimestamp(pm.GetCreationTimestamp())
			}
			if o.meta.GetUID() == "" {
				o.meta.SetUID(pm.GetUID())
			}
			_, err = s.cs.Invokes(k8stesting.NewUpdateAction(o.gvr, ns, o.obj), nil)
		}
		if err != nil {
			return applied, fmt.Errorf("%s: %w", o.ref, err)
		}
		applied = append(applied, o.ref)
	}
	return applied, nil
}

// delete removes the objects the documents name; only apiVersion, kind and
// metadata are read.
func (s kubeStore) delete(data []byte) ([]string, error) {
	docs, err := splitYAML(data)
	if err != nil {
		return nil, err
	}
	type target struct {
		gvr           schema.GroupVersionResource
		ns, name, ref string
	}
	var targets []target
	for i, doc := range docs {
		k, m, err := docMeta(doc)
		if err == nil {
			var gvr schema.GroupVersionResource
			if gvr, err = kubeResource(k); err == nil {
				ns := namespaceOf(gvr, m.Namespace)
				targets = append(targets, target{gvr, ns, m.Name, ref(k.Kind, ns, m.Name)})
			}
		}
		if err != nil {
			return nil, badInputf("document %d: %v", i, err)
		}
	}
	deleted := make([]string, 0, len(targets))
	for _, t := range targets {
		if _, err := s.cs.Invokes(k8stesting.NewDeleteAction(t.gvr, t.ns, t.name), nil); err != nil {
			return deleted, fmt.Errorf("%s: %w", t.ref, err)
		}
		deleted = append(deleted, t.ref)
	}
	return deleted, nil
}

// ---- Istio config -------------------------------------------------------

// configStore writes Istio config into the fake's config store, the
// in-memory store behind istiod's aggregate config controller. Its event
// handlers are the ones NewFakeDiscoveryServer registers (a ConfigUpdate per
// change, as istiod does for a CRD watch event) plus the ServiceEntry
// registry's own handler for ServiceEntry/WorkloadEntry.
type configStore struct {
	store model.ConfigStoreController
}

// parseConfig parses and validates every document, as istiod's validating
// webhook would, and defaults the namespace to "default" like the fake does
// for its initial ConfigString.
func parseConfig(data []byte) ([]config.Config, error) {
	if _, err := splitYAML(data); err != nil { // same per-document errors as elsewhere
		return nil, err
	}
	cfgs, unknown, err := crd.ParseInputs(string(data))
	if err != nil {
		return nil, badInputf("%v", err)
	}
	if len(unknown) > 0 {
		kinds := make([]string, 0, len(unknown))
		for _, u := range unknown {
			kinds = append(kinds, u.APIVersion+" "+u.Kind)
		}
		return nil, badInputf("not Istio config kinds: %s (Kubernetes objects go to --kube or /kube/apply)", strings.Join(kinds, ", "))
	}
	for i := range cfgs {
		if cfgs[i].Namespace == "" {
			cfgs[i].Namespace = "default"
		}
	}
	return cfgs, nil
}

func configRef(c config.Config) string { return ref(c.GroupVersionKind.Kind, c.Namespace, c.Name) }

func (s configStore) apply(cfgs []config.Config) ([]string, error) {
	applied := make([]string, 0, len(cfgs))
	for _, c := range cfgs {
		var err error
		if prev := s.store.Get(c.GroupVersionKind, c.Name, c.Namespace); prev == nil {
			if c.CreationTimestamp.IsZero() {
				c.CreationTimestamp = time.Now()
			}
			_, err = s.store.Create(c)
		} else {
			if c.CreationTimestamp.IsZero() {
				c.CreationTimestamp = prev.CreationTimestamp
			}
			c.ResourceVersion = "" // unconditional replace
			_, err = s.store.Update(c)
		}
		if err != nil {
			return applied, fmt.Errorf("%s: %w", configRef(c), err)
		}
		applied = append(applied, configRef(c))
	}
	return applied, nil
}

func (s configStore) delete(data []byte) ([]string, error) {
	docs, err := splitYAML(data)
	if err != nil {
		return nil, err
	}
	var targets []config.Config
	for i, doc := range docs {
		k, m, err := docMeta(doc)
		if err != nil {
			return nil, badInputf("document %d: %v", i, err)
		}
		sch, ok := collections.PilotGatewayAPI().FindByGroupVersionAliasesKind(resource.FromKubernetesGVK(&k))
		if !ok {
			return nil, badInputf("document %d: %s (%s) is not an Istio config kind", i, k.Kind, k.GroupVersion())
		}
		if m.Namespace == "" {
			m.Namespace = "default"
		}
		targets = append(targets, config.Config{Meta: config.Meta{GroupVersionKind: sch.GroupVersionKind(), Name: m.Name, Namespace: m.Namespace}})
	}
	deleted := make([]string, 0, len(targets))
	for _, t := range targets {
		if s.store.Get(t.GroupVersionKind, t.Name, t.Namespace) == nil {
			return deleted, notFound{fmt.Errorf("%s: not found", configRef(t))}
		}
		if err := s.store.Delete(t.GroupVersionKind, t.Name, t.Namespace, nil); err != nil {
			return deleted, fmt.Errorf("%s: %w", configRef(t), err)
		}
		deleted = append(deleted, configRef(t))
	}
	return deleted, nil
}
