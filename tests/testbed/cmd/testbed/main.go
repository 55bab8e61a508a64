// Command testbed starts a real Kubernetes control plane (etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler, all built from Go
// modules next to it) on 127.0.0.1 with free ports, keeps all state in a run
// directory, and stops every child when it is stopped itself.
//
//	testbed up [flags] RUNDIR
//
// It runs in the foreground: when the control plane is ready it writes
// RUNDIR/env (KEY=value lines) and prints "TESTBED READY" followed by the same
// lines on stdout. SIGTERM, SIGINT or SIGHUP stop the children in reverse
// order (TERM, then KILL after a grace period); if any child exits on its own
// the others are stopped too and testbed exits 1. The children also get
// SIGKILL from the kernel if testbed dies without cleaning up (PDEATHSIG).
//
// Fault injection: once ready, SIGUSR1 makes testbed SIGKILL kube-apiserver,
// start it again with the same arguments (same port, certificates, etcd) and
// wait for its /readyz; it then logs "kube-apiserver restarted: ..." on stderr
// (an exit it caused itself does not stop the test bed). A SIGUSR1 that
// arrives during a restart is taken after it.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	serviceCIDR   = "10.0.0.0/24" // allocation range only: nothing ever routes there
	serviceIssuer = "https://kubernetes.default.svc.cluster.local"
	clusterName   = "stoker-testbed"
)

// Admission: a small set that keeps the behaviour Spark-on-k8s relies on
// (namespaces, service accounts, quotas, limit ranges, priorities, node
// taints/restriction), plus Pod Security admission and ValidatingAdmissionPolicy,
// which judge the pods stoker creates as a driver; everything else that is on by
// default is switched off.
var (
	admissionOn = []string{
		"NamespaceLifecycle", "LimitRanger", "ServiceAccount", "NodeRestriction",
		"TaintNodesByCondition", "Priority", "DefaultTolerationSeconds", "ResourceQuota",
		"PodSecurity", "ValidatingAdmissionPolicy",
	}
	admissionOff = []string{
		"DefaultStorageClass", "PersistentVolumeClaimResize", "StorageObjectInUseProtection",
		"PodGroupProtection", "RuntimeClass", "CertificateApproval", "CertificateSigning",
		"ClusterTrustBundleAttest", "CertificateSubjectRestriction", "DefaultIngressClass",
		"PodTopologyLabels", "MutatingAdmissionPolicy",
		"MutatingAdmissionWebhook", "ValidatingAdmissionWebhook", "NodeDeclaredFeatureValidator",
		"PodResizeValidator",
	}
)

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, " ") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "up":
		os.Exit(up(os.Args[2:]))
	case "-h", "--help", "help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "testbed: unknown command %q\n", os.Args[1])
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: testbed up [flags] RUNDIR   (testbed up -h for flags)")
	os.Exit(2)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s testbed: %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

type ports struct {
	EtcdClient int `json:"etcd_client"`
	EtcdPeer   int `json:"etcd_peer"`
	APIServer  int `json:"apiserver"`
	KCM        int `json:"controller_manager"`
	Scheduler  int `json:"scheduler"`
}

func up(args []string) int {
	self, _ := os.Executable()
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	binDir := fs.String("bin-dir", filepath.Dir(self), "folder with etcd, kube-apiserver, kube-controller-manager, kube-scheduler")
	timeout := fs.Duration("timeout", 3*time.Minute, "how long start-up may take")
	var etcdArgs, apiArgs, kcmArgs, schedArgs multiFlag
	fs.Var(&etcdArgs, "etcd-arg", "extra etcd flag, appended (repeatable)")
	fs.Var(&apiArgs, "apiserver-arg", "extra kube-apiserver flag, appended (repeatable)")
	fs.Var(&kcmArgs, "controller-manager-arg", "extra kube-controller-manager flag, appended (repeatable)")
	fs.Var(&schedArgs, "scheduler-arg", "extra kube-scheduler flag, appended (repeatable)")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: testbed up [flags] RUNDIR")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	dir, err := filepath.Abs(fs.Arg(0))
	if err != nil {
		logf("%v", err)
		return 2
	}
	if strings.ContainsAny(dir, " \t\n'\"$`\\") {
		logf("run directory %q: no spaces, quotes or shell characters please (env is sourced by shells)", dir)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer stop()
	// Registered at once: SIGUSR1's default action would end the process.
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)

	s := &supervisor{dir: dir, bin: *binDir, spawn: newSpawner(), usr1: usr1, exits: make(chan *component, 16)}
	code := s.run(ctx, *timeout, etcdArgs, apiArgs, kcmArgs, schedArgs)
	return code
}

type supervisor struct {
	dir   string
	bin   string
	spawn *spawner
	comps []*component
	usr1  <-chan os.Signal
	// exits gets every component that exits unless the supervisor killed it itself (a restart).
	exits chan *component
}

func (s *supervisor) p(elem ...string) string {
	return filepath.Join(append([]string{s.dir}, elem...)...)
}

func (s *supervisor) run(ctx context.Context, timeout time.Duration, etcdArgs, apiArgs, kcmArgs, schedArgs []string) (code int) {
	for _, d := range []string{"", "pki", "logs", "pids", "etcd", "apiserver", "controller-manager", "scheduler"} {
		if err := os.MkdirAll(s.p(d), 0o700); err != nil {
			logf("%v", err)
			return 1
		}
	}
	if pid, ok := alivePid(s.p("pids", "testbed.pid")); ok && pid != os.Getpid() {
		logf("a test bed (pid %d) is already running in %s; stop it first (stop.sh %s)", pid, s.dir, s.dir)
		return 1
	}
	_ = os.Remove(s.p("env"))
	if err := os.WriteFile(s.p("pids", "testbed.pid"), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		logf("%v", err)
		return 1
	}
	defer func() {
		s.shutdown()
		_ = os.Remove(s.p("env"))
		_ = os.Remove(s.p("pids", "testbed.pid"))
		logf("stopped")
	}()

	for _, b := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"} {
		if _, err := os.Stat(filepath.Join(s.bin, b)); err != nil {
			logf("missing binary: %v (run build.sh)", err)
			return 1
		}
	}

	pt, err := s.ports()
	if err != nil {
		logf("ports: %v", err)
		return 1
	}
	_, svcNet, _ := net.ParseCIDR(serviceCIDR)
	svcIP := make(net.IP, 4)
	copy(svcIP, svcNet.IP.To4())
	svcIP[3] = 1
	pk := pki{dir: s.p("pki")}
	if err := pk.ensure(svcIP); err != nil {
		logf("certificates: %v", err)
		return 1
	}
	apiURL := fmt.Sprintf("https://127.0.0.1:%d", pt.APIServer)
	for file, stem := range map[string]string{
		"kubeconfig":                    "admin",
		"controller-manager.kubeconfig": "controller-manager",
		"scheduler.kubeconfig":          "scheduler",
	} {
		if err := pk.writeKubeconfig(s.p(file), apiURL, stem); err != nil {
			logf("kubeconfig %s: %v", file, err)
			return 1
		}
	}
	adminClient, err := httpClient(pk, true)
	if err != nil {
		logf("%v", err)
		return 1
	}
	insecure := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // loopback health check of a self-signed endpoint
	}}
	deadline := time.Now().Add(timeout)
	started := time.Now()

	// etcd
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", pt.EtcdClient)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", pt.EtcdPeer)
	if err := s.start("etcd", "etcd", append([]string{
		"--name=testbed",
		"--data-dir=" + s.p("etcd"),
		"--listen-client-urls=" + etcdURL,
		"--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=testbed=" + peerURL,
		"--initial-cluster-token=" + clusterName,
		"--unsafe-no-fsync=true", // throw-away test data; spares the shared disk
		"--quota-backend-bytes=2147483648",
		"--log-level=warn",
	}, etcdArgs...)); err != nil {
		logf("%v", err)
		return 1
	}
	if err := s.waitFor(ctx, deadline, "etcd", func() error {
		return httpGetOK(insecure, etcdURL+"/health", `"health":"true"`)
	}); err != nil {
		logf("%v", err)
		return 1
	}

	// kube-apiserver
	if err := s.start("kube-apiserver", "kube-apiserver", append([]string{
		"--advertise-address=127.0.0.1",
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(pt.APIServer),
		"--cert-dir=" + s.p("apiserver"),
		"--tls-cert-file=" + pk.ServingCert(),
		"--tls-private-key-file=" + pk.ServingKey(),
		"--client-ca-file=" + pk.CACert(),
		"--token-auth-file=" + pk.Tokens(),
		"--etcd-servers=" + etcdURL,
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=" + serviceIssuer,
		"--service-account-key-file=" + pk.SAPub(),
		"--service-account-signing-key-file=" + pk.SAKey(),
		"--service-cluster-ip-range=" + serviceCIDR,
		// No Endpoints for the "kubernetes" Service: 127.0.0.1 may not be an
		// endpoint address, and nothing here routes Service IPs anyway.
		"--endpoint-reconciler-type=none",
		"--enable-admission-plugins=" + strings.Join(admissionOn, ","),
		"--disable-admission-plugins=" + strings.Join(admissionOff, ","),
		"--allow-privileged=true",
		"--requestheader-client-ca-file=" + pk.FrontProxyCA(),
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-uid-headers=X-Remote-Uid",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file=" + pk.FrontProxyCert(),
		"--proxy-client-key-file=" + pk.FrontProxyKey(),
		"--kubelet-client-certificate=" + pk.KubeletClientCert(),
		"--kubelet-client-key=" + pk.KubeletClientKey(),
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		"--profiling=false",
	}, apiArgs...)); err != nil {
		logf("%v", err)
		return 1
	}
	if err := s.waitFor(ctx, deadline, "kube-apiserver", func() error {
		return httpGetOK(adminClient, apiURL+"/readyz", "")
	}); err != nil {
		logf("%v", err)
		return 1
	}

	// kube-controller-manager and kube-scheduler
	kcmKC := s.p("controller-manager.kubeconfig")
	if err := s.start("kube-controller-manager", "kube-controller-manager", append([]string{
		"--kubeconfig=" + kcmKC,
		"--authentication-kubeconfig=" + kcmKC,
		"--authorization-kubeconfig=" + kcmKC,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(pt.KCM),
		"--cert-dir=" + s.p("controller-manager"),
		// default is /usr/libexec/kubernetes/..., which it would create
		"--flex-volume-plugin-dir=" + s.p("controller-manager", "flexvolume"),
		"--leader-elect=false",
		"--cluster-name=" + clusterName,
		"--controllers=*",
		"--use-service-account-credentials=true",
		"--root-ca-file=" + pk.CACert(),
		"--service-account-private-key-file=" + pk.SAKey(),
		"--cluster-signing-cert-file=" + pk.CACert(),
		"--cluster-signing-key-file=" + pk.CAKey(),
		"--service-cluster-ip-range=" + serviceCIDR,
		"--profiling=false",
		// A node that stops reporting is Unknown after 20 s instead of 50 s (the process
		// kubelet renews its Lease every 5 s), checked every 2 s instead of 5 s.
		"--node-monitor-grace-period=20s",
		"--node-monitor-period=2s",
		// Default 20 QPS: garbage collection and namespace deletion of thousands of pods.
		"--kube-api-qps=200",
		"--kube-api-burst=400",
	}, kcmArgs...)); err != nil {
		logf("%v", err)
		return 1
	}
	schedKC := s.p("scheduler.kubeconfig")
	if err := s.start("kube-scheduler", "kube-scheduler", append([]string{
		"--kubeconfig=" + schedKC,
		"--authentication-kubeconfig=" + schedKC,
		"--authorization-kubeconfig=" + schedKC,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(pt.Scheduler),
		"--cert-dir=" + s.p("scheduler"),
		"--leader-elect=false",
		"--profiling=false",
		// The default client limit (50 QPS) caps bindings near 50 pods/s, which would make
		// the scheduler, not the systems under test, the limit of ramp-up benchmarks.
		"--kube-api-qps=1000",
		"--kube-api-burst=2000",
	}, schedArgs...)); err != nil {
		logf("%v", err)
		return 1
	}
	if err := s.waitFor(ctx, deadline, "kube-controller-manager", func() error {
		return httpGetOK(insecure, fmt.Sprintf("https://127.0.0.1:%d/healthz", pt.KCM), "")
	}); err != nil {
		logf("%v", err)
		return 1
	}
	if err := s.waitFor(ctx, deadline, "kube-scheduler", func() error {
		return httpGetOK(insecure, fmt.Sprintf("https://127.0.0.1:%d/readyz", pt.Scheduler), "")
	}); err != nil {
		logf("%v", err)
		return 1
	}
	// The controllers work: the service account controller made "default" in
	// "default", and the root CA publisher its ConfigMap (pods need both).
	if err := s.waitFor(ctx, deadline, "default ServiceAccount and kube-root-ca.crt", func() error {
		if err := httpGetOK(adminClient, apiURL+"/api/v1/namespaces/default/serviceaccounts/default", ""); err != nil {
			return err
		}
		return httpGetOK(adminClient, apiURL+"/api/v1/namespaces/default/configmaps/kube-root-ca.crt", "")
	}); err != nil {
		logf("%v", err)
		return 1
	}

	token, _ := os.ReadFile(pk.AdminToken())
	env := [][2]string{
		{"TESTBED_DIR", s.dir},
		{"TESTBED_PID", strconv.Itoa(os.Getpid())},
		{"KUBECONFIG", s.p("kubeconfig")},
		{"APISERVER_URL", apiURL},
		{"APISERVER_PORT", strconv.Itoa(pt.APIServer)},
		{"ETCD_URL", etcdURL},
		{"ETCD_PORT", strconv.Itoa(pt.EtcdClient)},
		{"CONTROLLER_MANAGER_PORT", strconv.Itoa(pt.KCM)},
		{"SCHEDULER_PORT", strconv.Itoa(pt.Scheduler)},
		{"CA_CERT", pk.CACert()},
		{"CA_KEY", pk.CAKey()},
		{"ADMIN_CERT", pk.AdminCert()},
		{"ADMIN_KEY", pk.AdminKey()},
		{"ADMIN_TOKEN", strings.TrimSpace(string(token))},
		{"SERVICE_ACCOUNT_ISSUER", serviceIssuer},
		{"SERVICE_ACCOUNT_KEY", pk.SAKey()},
		{"SERVICE_CLUSTER_IP_RANGE", serviceCIDR},
		{"KUBECACHEDIR", s.p("kube-cache")}, // kubectl's discovery cache, else ~/.kube/cache
		{"BIN_DIR", s.bin},
		{"LOG_DIR", s.p("logs")},
	}
	var b strings.Builder
	for _, kv := range env {
		fmt.Fprintf(&b, "%s=%s\n", kv[0], kv[1])
	}
	if err := os.WriteFile(s.p("env.tmp"), []byte(b.String()), 0o600); err == nil {
		err = os.Rename(s.p("env.tmp"), s.p("env"))
	}
	if err != nil {
		logf("writing env: %v", err)
		return 1
	}
	logf("ready in %s: %s (KUBECONFIG=%s)", time.Since(started).Round(time.Millisecond), apiURL, s.p("kubeconfig"))
	fmt.Printf("TESTBED READY\n%s", b.String())

	for {
		select {
		case <-ctx.Done():
			logf("signal received, stopping")
			return 0
		case c := <-s.exits:
			logf("%s exited unexpectedly (%v); stopping the rest; see %s", c.name, c.err, c.logPath)
			tail(c.logPath, 20)
			return 1
		case <-s.usr1:
			if err := s.restart(ctx, "kube-apiserver", timeout, func() error {
				return httpGetOK(adminClient, apiURL+"/readyz", "")
			}); err != nil {
				if ctx.Err() != nil {
					logf("signal received during a restart, stopping")
					return 0
				}
				logf("restarting kube-apiserver: %v; stopping", err)
				return 1
			}
		}
	}
}

// restart SIGKILLs the running component `name`, starts it again with the
// same binary and arguments, and waits until `ready` passes.
func (s *supervisor) restart(ctx context.Context, name string, timeout time.Duration, ready func() error) error {
	var old *component
	for _, c := range s.comps {
		if c.name == name {
			old = c
		}
	}
	if old == nil {
		return fmt.Errorf("no component %s", name)
	}
	t0 := time.Now()
	old.expected.Store(true)
	_ = old.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-old.done:
	case <-time.After(30 * time.Second):
		return fmt.Errorf("%s (pid %d) did not die within 30s of SIGKILL", name, old.cmd.Process.Pid)
	}
	logf("%s (pid %d) killed (SIGKILL) for a restart", name, old.cmd.Process.Pid)
	comps := s.comps[:0]
	for _, c := range s.comps {
		if c != old {
			comps = append(comps, c)
		}
	}
	s.comps = comps
	if err := s.start(name, old.binary, old.args); err != nil {
		return err
	}
	// The restarted component goes last: shutdown stops it first, which is right for the API
	// server (its clients, the controller manager and scheduler, do not mind).
	if err := s.waitFor(ctx, time.Now().Add(timeout), name, ready); err != nil {
		return err
	}
	logf("%s restarted: killed, started again (pid %d), ready %s after the kill",
		name, s.comps[len(s.comps)-1].cmd.Process.Pid, time.Since(t0).Round(time.Millisecond))
	return nil
}

// ports reuses the ports of the previous run in the same folder when they are
// still free (etcd keeps its peer URL in its data), else picks new ones.
func (s *supervisor) ports() (ports, error) {
	var pt ports
	file := s.p("ports.json")
	if b, err := os.ReadFile(file); err == nil && json.Unmarshal(b, &pt) == nil {
		all := []int{pt.EtcdClient, pt.EtcdPeer, pt.APIServer, pt.KCM, pt.Scheduler}
		ok := true
		for _, p := range all {
			if p == 0 || !portFree(p) {
				ok = false
			}
		}
		if ok {
			return pt, nil
		}
	}
	seen := map[int]bool{}
	pick := func() (int, error) {
		for i := 0; i < 50; i++ {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				return 0, err
			}
			p := l.Addr().(*net.TCPAddr).Port
			_ = l.Close()
			if !seen[p] {
				seen[p] = true
				return p, nil
			}
		}
		return 0, errors.New("no free port")
	}
	for _, f := range []*int{&pt.EtcdClient, &pt.EtcdPeer, &pt.APIServer, &pt.KCM, &pt.Scheduler} {
		p, err := pick()
		if err != nil {
			return pt, err
		}
		*f = p
	}
	b, _ := json.MarshalIndent(pt, "", "  ")
	return pt, os.WriteFile(file, append(b, '\n'), 0o644)
}

func portFree(p int) bool {
	l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}

type component struct {
	name     string
	binary   string
	args     []string
	expected atomic.Bool // killed by the supervisor (a restart): not a reason to stop
	logPath  string
	pidPath  string
	cmd      *exec.Cmd
	done     chan struct{}
	err      error
}

func (s *supervisor) start(name, binary string, args []string) error {
	logPath := s.p("logs", name+".log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(lf, "\n==== %s testbed: starting %s %s\n", time.Now().Format(time.RFC3339), binary, strings.Join(args, " "))
	cmd := exec.Command(filepath.Join(s.bin, binary), args...)
	cmd.Dir = s.dir
	cmd.Stdin = nil
	cmd.Stdout = lf
	cmd.Stderr = lf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:   true,            // a terminal's Ctrl-C reaches testbed only; it stops them in order
		Pdeathsig: syscall.SIGKILL, // and if testbed is killed outright, the kernel ends them
	}
	if err := s.spawn.start(cmd); err != nil {
		lf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	c := &component{name: name, binary: binary, args: args, logPath: logPath, pidPath: s.p("pids", name+".pid"),
		cmd: cmd, done: make(chan struct{})}
	_ = os.WriteFile(c.pidPath, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
	s.comps = append(s.comps, c)
	go func() {
		c.err = cmd.Wait()
		lf.Close()
		close(c.done)
		if !c.expected.Load() {
			select {
			case s.exits <- c:
			default:
			}
		}
	}()
	logf("started %s (pid %d), log %s", name, cmd.Process.Pid, logPath)
	return nil
}

func (s *supervisor) waitFor(ctx context.Context, deadline time.Time, what string, check func() error) error {
	t0 := time.Now()
	var last error
	for {
		for _, c := range s.comps {
			select {
			case <-c.done:
				tail(c.logPath, 30)
				return fmt.Errorf("%s exited during start-up (%v); log: %s", c.name, c.err, c.logPath)
			default:
			}
		}
		if last = check(); last == nil {
			logf("%s ready after %s", what, time.Since(t0).Round(time.Millisecond))
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out waiting for %s: %v", what, last)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("interrupted while waiting for %s", what)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// shutdown stops the components in reverse start order: SIGTERM, then SIGKILL
// after a grace period.
func (s *supervisor) shutdown() {
	for i := len(s.comps) - 1; i >= 0; i-- {
		c := s.comps[i]
		select {
		case <-c.done:
		default:
			_ = c.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-c.done:
			case <-time.After(15 * time.Second):
				logf("%s did not stop within 15s, killing it", c.name)
				_ = c.cmd.Process.Kill()
				<-c.done
			}
		}
		_ = os.Remove(c.pidPath)
	}
	s.comps = nil
}

// spawner starts children from one OS thread that never exits: PDEATHSIG is
// delivered when the thread that forked a child exits, not the process.
type spawner struct {
	reqs chan spawnReq
}

type spawnReq struct {
	cmd  *exec.Cmd
	errc chan error
}

func newSpawner() *spawner {
	sp := &spawner{reqs: make(chan spawnReq)}
	go func() {
		runtime.LockOSThread() // never unlocked: this thread lives as long as the process
		for r := range sp.reqs {
			r.errc <- r.cmd.Start()
		}
	}()
	return sp
}

func (sp *spawner) start(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	sp.reqs <- spawnReq{cmd: cmd, errc: errc}
	return <-errc
}

func httpClient(pk pki, withAdminCert bool) (*http.Client, error) {
	caPEM, err := os.ReadFile(pk.CACert())
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("bad CA certificate")
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if withAdminCert {
		pair, err := tls.LoadX509KeyPair(pk.AdminCert(), pk.AdminKey())
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}, nil
}

func httpGetOK(c *http.Client, url, want string) error {
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %.300s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	if want != "" && !strings.Contains(string(body), want) {
		return fmt.Errorf("GET %s: body %.200q lacks %q", url, body, want)
	}
	return nil
}

// alivePid reads a pid file and tells whether that process still exists.
func alivePid(path string) (int, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	// Running (a zombie has no exe link) and a testbed binary (not a reused pid).
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil || filepath.Base(strings.TrimSuffix(exe, " (deleted)")) != "testbed" {
		return pid, false
	}
	return pid, true
}

func tail(path string, n int) {
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	fmt.Fprintf(os.Stderr, "---- last %d lines of %s\n%s\n----\n", len(lines), path, strings.Join(lines, "\n"))
}
