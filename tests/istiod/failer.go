package main

import (
	"fmt"
	"os"
	"sync"

	istiolog "istio.io/istio/pkg/log"
	"istio.io/istio/pkg/test"
)

// failer is the test.Failer that Istio's fakes are written against, for a
// process instead of a *testing.T: a fatal error ends the process (the Rust
// test sees the exit), and Cleanup functions run when we shut down.
//
// Nothing may depend on the cleanups for correctness: tests also SIGKILL us.
type failer struct {
	mu       sync.Mutex
	cleanups []func()
	tempDir  string
}

var _ test.Failer = (*failer)(nil)

func (f *failer) Fail()        { f.Fatal("Fail called") }
func (f *failer) FailNow()     { f.Fatal("FailNow called") }
func (f *failer) Helper()      {}
func (f *failer) Log(a ...any) { istiolog.Info(fmt.Sprint(a...)) }

func (f *failer) Logf(format string, a ...any) { istiolog.Infof(format, a...) }

// Fatal exits at once, without the cleanups: it may be called from any
// goroutine, including one a cleanup is waiting for.
func (f *failer) Fatal(a ...any) {
	exit(fmt.Errorf("fatal: %s", fmt.Sprint(a...)))
}

func (f *failer) Fatalf(format string, a ...any) { f.Fatal(fmt.Sprintf(format, a...)) }

// Skip means a fake refused to run in this configuration: that is fatal here.
func (f *failer) Skip(a ...any) { f.Fatal(append([]any{"skip: "}, a...)...) }

func (f *failer) Cleanup(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cleanups = append(f.cleanups, fn)
}

func (f *failer) TempDir() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.tempDir == "" {
		dir, err := os.MkdirTemp("", "sockmesh-istiod-")
		if err != nil {
			f.Fatal(err) // exits; the lock does not matter
		}
		f.tempDir = dir
		f.cleanups = append(f.cleanups, func() { _ = os.RemoveAll(dir) })
	}
	return f.tempDir
}

// runCleanups runs the registered functions last-first, as testing.T does.
func (f *failer) runCleanups() {
	f.mu.Lock()
	fns := f.cleanups
	f.cleanups = nil
	f.mu.Unlock()
	for i := len(fns) - 1; i >= 0; i-- {
		fns[i]()
	}
}
