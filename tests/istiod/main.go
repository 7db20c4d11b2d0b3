// Command sockmesh-istiod runs istiod's discovery server in-process, over a
// fake in-memory Kubernetes client, so sockmesh's namespace tests can follow
// a live istiod: istiod's own config generation, debounce and push code,
// served on a real loopback TCP port with istiod's gRPC server options.
// Kubernetes objects and Istio config are changed over a small HTTP API.
// See README.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"

	meshconfig "istio.io/api/mesh/v1alpha1"
	istiogrpc "istio.io/istio/pilot/pkg/grpc"
	xdsfake "istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/config"
	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/keepalive"
	istiolog "istio.io/istio/pkg/log"
	xdsmetrics "istio.io/istio/pkg/xds"
)

// istiodEnv is the feature-flag environment istiod runs with here. Istio
// reads these once, in package init, so they must be in the environment
// before the process starts: main re-executes itself with them set.
// A variable already in the environment wins; --env wins over both.
var istiodEnv = map[string]string{
	// Ambient mode (Istio's ambient profile sets it): without it istiod
	// builds no ambient index, so namespaces labelled
	// istio.io/dataplane-mode=ambient mean nothing to it.
	"PILOT_ENABLE_AMBIENT": "true",
}

// reexecMarker is set in the re-executed process.
const reexecMarker = "SOCKMESH_ISTIOD_REEXEC"

type options struct {
	kube, config, env       []string
	mesh, ads, http, ready  string
	debounce, maxAge, grace time.Duration
	logOpts                 *istiolog.Options
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func parseFlags() options {
	o := options{logOpts: istiolog.DefaultOptions()}
	fs := flag.NewFlagSet(os.Args[0], flag.ExitOnError)
	fs.Var((*listFlag)(&o.kube), "kube", "Kubernetes objects YAML (Namespaces, Services, Pods, EndpointSlices, Nodes…) to start with: a file, or a directory of *.yaml/*.yml; repeatable")
	fs.Var((*listFlag)(&o.config), "config", "Istio config YAML (DestinationRule, VirtualService, ServiceEntry, Sidecar…) to start with: a file or directory; repeatable")
	fs.StringVar(&o.mesh, "mesh", "", "MeshConfig YAML file, applied over istiod's defaults (default: the defaults)")
	fs.StringVar(&o.ads, "ads", "127.0.0.1:0", "ADS gRPC (plaintext, like istiod's :15010) listen address; loopback only")
	fs.StringVar(&o.http, "http", "127.0.0.1:0", "control HTTP API listen address; loopback only")
	fs.StringVar(&o.ready, "ready-file", "", `once serving, write {"ads":ADDR,"http":ADDR,"pid":N} here (atomically)`)
	fs.DurationVar(&o.debounce, "debounce", 100*time.Millisecond, "push debounce (istiod's PILOT_DEBOUNCE_AFTER, default 100ms)")
	fs.DurationVar(&o.maxAge, "max-connection-age", 30*time.Minute,
		"gRPC MaxConnectionAge (istiod's --keepaliveMaxServerConnectionAge: 30m in Istio's Helm chart; the binary's own default is infinite); 0 = infinite")
	fs.DurationVar(&o.grace, "max-connection-age-grace", keepalive.DefaultOption().MaxServerConnectionAgeGrace,
		"time a stream may outlive --max-connection-age before it is cut (istiod's default 10s)")
	fs.Var((*listFlag)(&o.env), "env", "KEY=VALUE set in istiod's environment (feature flags such as PILOT_ENABLE_AMBIENT=false); repeatable")
	// istiod's own logging flags: --log_output_level=default:info,ads:debug, --log_as_json, ...
	o.logOpts.AttachFlags(func(*[]string, string, []string, string) {}, fs.StringVar, fs.IntVar, fs.BoolVar)
	_ = fs.Parse(os.Args[1:])
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "unexpected arguments: %q\n", fs.Args())
		os.Exit(2)
	}
	return o
}

func main() {
	o := parseFlags()
	if os.Getenv(reexecMarker) == "" {
		exit(reexec(o.env)) // returns only on error
	}
	if err := run(o); err != nil {
		exit(err)
	}
}

// exit reports a fatal error on stderr (istiod's logs go to stdout).
func exit(err error) {
	fmt.Fprintf(os.Stderr, "sockmesh-istiod: %v\n", err)
	os.Exit(1)
}

// reexec replaces the process with itself, istiodEnv and --env set.
func reexec(extra []string) error {
	for k, v := range istiodEnv {
		if _, set := os.LookupEnv(k); !set {
			_ = os.Setenv(k, v)
		}
	}
	for _, kv := range extra {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fmt.Errorf("--env %q: want KEY=VALUE", kv)
		}
		_ = os.Setenv(k, v)
	}
	_ = os.Setenv(reexecMarker, "1")
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	return syscall.Exec(exe, os.Args, os.Environ())
}

func run(o options) error {
	if err := istiolog.Configure(o.logOpts); err != nil {
		return err
	}
	ads, err := loopback("ads", o.ads)
	if err != nil {
		return err
	}
	httpAddr, err := loopback("http", o.http)
	if err != nil {
		return err
	}
	if o.maxAge < 0 || o.grace < 0 {
		return errors.New("--max-connection-age and --max-connection-age-grace must not be negative")
	}
	if o.ready != "" {
		// A SIGKILLed predecessor leaves its file behind; it must not be
		// mistaken for ours. (Callers should remove it before starting us.)
		_ = os.Remove(o.ready)
	}
	logEnv()

	kubeObjs, cfgs, meshCfg, err := loadInitial(o)
	if err != nil {
		return err
	}

	f := &failer{}
	defer f.runCleanups()
	start := time.Now()
	// Returns once informers have synced and the first PushContext is
	// committed, and marks the discovery server ready.
	fake := xdsfake.NewFakeDiscoveryServer(f, xdsfake.FakeOptions{
		KubernetesObjects: kubeObjs,
		Configs:           cfgs,
		MeshConfig:        meshCfg,
		DebounceTime:      o.debounce,
	})
	istiolog.Infof("discovery server ready in %v (%d kube objects, %d configs)", time.Since(start).Round(time.Millisecond), len(kubeObjs), len(cfgs))

	// ADS: the fake serves on an in-memory bufconn with a bare
	// grpc.NewServer(). We register the same DiscoveryServer (same push
	// queue, generators and connections) on a server built as istiod's
	// initGrpcServer builds its plaintext one: istiod's keepalive,
	// MaxConnectionAge, max streams and 4 MiB receive limit.
	ka := keepalive.DefaultOption()
	ka.MaxServerConnectionAge = o.maxAge
	if o.maxAge == 0 {
		ka.MaxServerConnectionAge = keepalive.Infinity
	}
	ka.MaxServerConnectionAgeGrace = o.grace
	grpcServer := grpc.NewServer(istiogrpc.ServerOptions(ka, xdsmetrics.RecordRecvSize)...)
	fake.Discovery.Register(grpcServer)
	adsLn, err := net.Listen("tcp", ads)
	if err != nil {
		return err
	}
	go func() {
		if err := grpcServer.Serve(adsLn); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			f.Fatalf("ADS server: %v", err)
		}
	}()
	defer grpcServer.Stop() // not GracefulStop: ADS streams never end by themselves

	a := &api{
		fake:   fake,
		kube:   kubeStore{cs: fake.KubeClient().Kube().(*kubefake.Clientset)},
		config: configStore{store: fake.Store()},
	}
	httpLn, err := net.Listen("tcp", httpAddr)
	if err != nil {
		return err
	}
	httpServer := &http.Server{Handler: a.handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := httpServer.Serve(httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			f.Fatalf("HTTP server: %v", err)
		}
	}()

	istiolog.Infof("serving ADS on %s, HTTP on %s (max connection age %v, debounce %v)", adsLn.Addr(), httpLn.Addr(), o.maxAge, o.debounce)
	if o.ready != "" {
		if err := writeReady(o.ready, adsLn.Addr().String(), httpLn.Addr().String()); err != nil {
			return err
		}
		defer os.Remove(o.ready)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	<-ctx.Done()
	istiolog.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = httpServer.Shutdown(shutdownCtx)
	return nil // deferred: remove ready file, stop gRPC, run cleanups
}

// loadInitial reads --kube, --config and --mesh, so that a bad file fails
// with a clear message before anything starts.
func loadInitial(o options) ([]runtime.Object, []config.Config, *meshconfig.MeshConfig, error) {
	var objs []runtime.Object
	if len(o.kube) > 0 {
		y, err := readPaths(o.kube)
		if err != nil {
			return nil, nil, nil, err
		}
		parsed, err := parseKube([]byte(y))
		if err != nil {
			return nil, nil, nil, fmt.Errorf("--kube: %v", err)
		}
		for _, p := range parsed {
			stampNew(p.meta)
			objs = append(objs, p.obj)
		}
	}
	var cfgs []config.Config
	if len(o.config) > 0 {
		y, err := readPaths(o.config)
		if err != nil {
			return nil, nil, nil, err
		}
		if cfgs, err = parseConfig([]byte(y)); err != nil {
			return nil, nil, nil, fmt.Errorf("--config: %v", err)
		}
	}
	var m *meshconfig.MeshConfig
	if o.mesh != "" {
		b, err := os.ReadFile(o.mesh)
		if err != nil {
			return nil, nil, nil, err
		}
		if m, err = mesh.ApplyMeshConfigDefaults(string(b)); err != nil {
			return nil, nil, nil, fmt.Errorf("--mesh: %v", err)
		}
	}
	return objs, cfgs, m, nil
}

// loopback accepts only a loopback IP (or "localhost") and a port.
func loopback(name, addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("--%s %q: %v", name, addr, err)
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ip, err := netip.ParseAddr(host)
	if err != nil || !ip.IsLoopback() {
		return "", fmt.Errorf("--%s %q: only loopback addresses (127.0.0.0/8, ::1) are allowed", name, addr)
	}
	return net.JoinHostPort(ip.String(), port), nil
}

// writeReady writes the ready file atomically: a reader sees all of it or
// none of it.
func writeReady(path, ads, http string) error {
	b, err := json.Marshal(map[string]any{"ads": ads, "http": http, "pid": os.Getpid()})
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// logEnv logs the istiod feature flags in effect.
func logEnv() {
	var set []string
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "PILOT_") || strings.HasPrefix(k, "ISTIO_") || istiodEnv[k] != "" {
			set = append(set, kv)
		}
	}
	sort.Strings(set)
	istiolog.Infof("istiod environment: %s", strings.Join(set, " "))
}
