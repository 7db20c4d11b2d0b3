package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	kerrors "k8s.io/apimachinery/pkg/api/errors"

	xdsfake "istio.io/istio/pilot/test/xds"
)

// maxBody bounds a request body; test fixtures are far smaller.
const maxBody = 64 << 20

// api is the control HTTP API the Rust tests drive (see README.md).
type api struct {
	fake   *xdsfake.FakeDiscoveryServer
	kube   kubeStore
	config configStore
	// writes serialises write requests, so each response's at_unix_nanos
	// and list describe that request's writes alone.
	writes sync.Mutex
}

func (a *api) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/kube/apply", post(a.write("applied", func(b []byte) (func() ([]string, error), error) {
		objs, err := parseKube(b)
		return func() ([]string, error) { return a.kube.apply(objs) }, err
	})))
	mux.HandleFunc("/kube/delete", post(a.write("deleted", func(b []byte) (func() ([]string, error), error) {
		return func() ([]string, error) { return a.kube.delete(b) }, nil
	})))
	mux.HandleFunc("/config/apply", post(a.write("applied", func(b []byte) (func() ([]string, error), error) {
		cfgs, err := parseConfig(b)
		return func() ([]string, error) { return a.config.apply(cfgs) }, err
	})))
	mux.HandleFunc("/config/delete", post(a.write("deleted", func(b []byte) (func() ([]string, error), error) {
		return func() ([]string, error) { return a.config.delete(b) }, nil
	})))
	mux.HandleFunc("/healthz", get(a.healthz))
	mux.HandleFunc("/pushes", get(a.pushes))
	// The discovery server's own debug handlers, unauthenticated (the mux
	// the fake returns is istiod's internal one), e.g. /debug/syncz,
	// /debug/adsz, /debug/connections, /debug/config_dump?proxyID=...
	mux.Handle("/debug/", get(a.fake.DiscoveryDebug.ServeHTTP))
	mux.HandleFunc("/syncz", get(func(w http.ResponseWriter, r *http.Request) {
		r2 := r.Clone(r.Context())
		r2.URL.Path = "/debug/syncz"
		a.fake.DiscoveryDebug.ServeHTTP(w, r2)
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Errorf("no such endpoint: %s %s", r.Method, r.URL.Path), nil)
	})
	return mux
}

// write runs one write request: parse validates the whole body before
// anything is written, then the returned function writes, timed by
// at_unix_nanos (wall clock just before the first write).
func (a *api) write(listKey string, parse func([]byte) (func() ([]string, error), error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Errorf("reading body: %v", err), nil)
			return
		}
		run, err := parse(body)
		if err != nil {
			writeError(w, statusOf(err), err, nil)
			return
		}
		a.writes.Lock()
		defer a.writes.Unlock()
		at := time.Now()
		done, err := run()
		out := map[string]any{listKey: done, "at_unix_nanos": at.UnixNano()}
		if err != nil {
			writeError(w, statusOf(err), err, out)
			return
		}
		writeJSON(w, http.StatusOK, out)
	}
}

func (a *api) healthz(w http.ResponseWriter, _ *http.Request) {
	if !a.fake.Discovery.IsServerReady() {
		writeError(w, http.StatusServiceUnavailable, errors.New("caches not synced"), nil)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"ready": true})
}

// pushes reports the discovery server's update counters: every change
// (config, service, endpoints) is one inbound update; after the debounce it
// is folded into a new PushContext and counted as committed, and pushes to
// the connected proxies are queued.
func (a *api) pushes(w http.ResponseWriter, _ *http.Request) {
	s := a.fake.Discovery
	// Read committed first: committed <= inbound then always holds.
	committed := s.CommittedUpdates.Load()
	writeJSON(w, http.StatusOK, map[string]any{
		"inbound_updates":   s.InboundUpdates.Load(),
		"committed_updates": committed,
		"push_version":      s.Env.PushContext().PushVersion,
		"connections":       len(s.AllClients()),
	})
}

func post(h http.HandlerFunc) http.HandlerFunc { return method(http.MethodPost, h) }
func get(h http.HandlerFunc) http.HandlerFunc  { return method(http.MethodGet, h) }

func method(m string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != m {
			w.Header().Set("Allow", m)
			writeError(w, http.StatusMethodNotAllowed, fmt.Errorf("%s takes %s, not %s", r.URL.Path, m, r.Method), nil)
			return
		}
		h(w, r)
	}
}

// statusOf maps an error to an HTTP status: bad input 400, a missing
// object 404, a Kubernetes API error its own code, anything else 500.
func statusOf(err error) int {
	var bad badInput
	var missing notFound
	var kstatus kerrors.APIStatus
	switch {
	case errors.As(err, &bad):
		return http.StatusBadRequest
	case errors.As(err, &missing):
		return http.StatusNotFound
	case errors.As(err, &kstatus) && kstatus.Status().Code != 0:
		return int(kstatus.Status().Code)
	}
	return http.StatusInternalServerError
}

// writeError answers {"error": "..."} plus any extra fields (e.g. what was
// written before the failure).
func writeError(w http.ResponseWriter, code int, err error, extra map[string]any) {
	out := map[string]any{"error": err.Error()}
	for k, v := range extra {
		out[k] = v
	}
	writeJSON(w, code, out)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
