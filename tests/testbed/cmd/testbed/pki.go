package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// pki is the set of files under <rundir>/pki. Everything is made once per run
// directory and reused when the test bed is started again on the same folder.
type pki struct {
	dir string
}

func (p pki) path(name string) string { return filepath.Join(p.dir, name) }

func (p pki) CACert() string      { return p.path("ca.crt") }
func (p pki) CAKey() string       { return p.path("ca.key") }
func (p pki) ServingCert() string { return p.path("apiserver.crt") }
func (p pki) ServingKey() string  { return p.path("apiserver.key") }
func (p pki) AdminCert() string   { return p.path("admin.crt") }
func (p pki) AdminKey() string    { return p.path("admin.key") }
func (p pki) KubeletClientCert() string {
	return p.path("apiserver-kubelet-client.crt")
}
func (p pki) KubeletClientKey() string { return p.path("apiserver-kubelet-client.key") }
func (p pki) FrontProxyCA() string     { return p.path("front-proxy-ca.crt") }
func (p pki) FrontProxyCert() string   { return p.path("front-proxy-client.crt") }
func (p pki) FrontProxyKey() string    { return p.path("front-proxy-client.key") }
func (p pki) SAKey() string            { return p.path("sa.key") }
func (p pki) SAPub() string            { return p.path("sa.pub") }
func (p pki) Tokens() string           { return p.path("tokens.csv") }
func (p pki) AdminToken() string       { return p.path("admin.token") }

type certSpec struct {
	name   string // file stem under pki/
	cn     string
	orgs   []string
	server bool
	dns    []string
	ips    []net.IP
}

// ensure creates whatever is missing. It does not regenerate files that exist,
// so a stopped test bed can be started again on its etcd data.
func (p pki) ensure(serviceIP net.IP) error {
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return err
	}
	caCert, caKey, err := p.ensureCA("ca", "stoker-testbed-ca")
	if err != nil {
		return err
	}
	// Separate CA for the aggregation layer's request-header authentication
	// (what kubeadm calls front-proxy), so delegated authentication in the
	// controller manager and scheduler is configured as in a real cluster.
	fpCert, fpKey, err := p.ensureCA("front-proxy-ca", "stoker-testbed-front-proxy-ca")
	if err != nil {
		return err
	}
	if !exists(p.path("front-proxy-client.crt")) || !exists(p.path("front-proxy-client.key")) {
		if err := p.issue(certSpec{name: "front-proxy-client", cn: "front-proxy-client"}, fpCert, fpKey); err != nil {
			return fmt.Errorf("certificate front-proxy-client: %w", err)
		}
	}
	specs := []certSpec{
		{
			name: "apiserver", cn: "kube-apiserver", server: true,
			dns: []string{
				"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
				"kubernetes.default.svc.cluster.local",
			},
			ips: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, serviceIP},
		},
		{name: "admin", cn: "stoker-testbed-admin", orgs: []string{"system:masters"}},
		{name: "controller-manager", cn: "system:kube-controller-manager"},
		{name: "scheduler", cn: "system:kube-scheduler"},
		{name: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}},
	}
	for _, s := range specs {
		if exists(p.path(s.name+".crt")) && exists(p.path(s.name+".key")) {
			continue
		}
		if err := p.issue(s, caCert, caKey); err != nil {
			return fmt.Errorf("certificate %s: %w", s.name, err)
		}
	}
	if !exists(p.SAKey()) || !exists(p.SAPub()) {
		// RSA: RS256 is what every JWT consumer understands.
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return err
		}
		pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
		if err != nil {
			return err
		}
		if err := writePEM(p.SAKey(), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key), 0o600); err != nil {
			return err
		}
		if err := writePEM(p.SAPub(), "PUBLIC KEY", pub, 0o644); err != nil {
			return err
		}
	}
	if !exists(p.Tokens()) || !exists(p.AdminToken()) {
		b := make([]byte, 24)
		if _, err := rand.Read(b); err != nil {
			return err
		}
		token := hex.EncodeToString(b)
		// --token-auth-file: token,user,uid,"group1,group2"
		line := fmt.Sprintf("%s,stoker-testbed-admin-token,stoker-testbed-admin-token,\"system:masters\"\n", token)
		if err := os.WriteFile(p.Tokens(), []byte(line), 0o600); err != nil {
			return err
		}
		if err := os.WriteFile(p.AdminToken(), []byte(token+"\n"), 0o600); err != nil {
			return err
		}
	}
	return nil
}

func (p pki) ensureCA(stem, cn string) (*x509.Certificate, crypto.Signer, error) {
	certFile, keyFile := p.path(stem+".crt"), p.path(stem+".key")
	if exists(certFile) && exists(keyFile) {
		cert, err := readCert(certFile)
		if err != nil {
			return nil, nil, err
		}
		key, err := readECKey(keyFile)
		if err != nil {
			return nil, nil, err
		}
		return cert, key, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          keyID(&key.PublicKey),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	if err := writeECKey(keyFile, key); err != nil {
		return nil, nil, err
	}
	if err := writePEM(certFile, "CERTIFICATE", der, 0o644); err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

func (p pki) issue(s certSpec, ca *x509.Certificate, caKey crypto.Signer) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: s.cn, Organization: s.orgs},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(5 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		DNSNames:     s.dns,
		IPAddresses:  s.ips,
	}
	if s.server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writeECKey(p.path(s.name+".key"), key); err != nil {
		return err
	}
	return writePEM(p.path(s.name+".crt"), "CERTIFICATE", der, 0o644)
}

// writeKubeconfig writes a self-contained kubeconfig (certificates embedded)
// for the client certificate <stem>.crt/.key.
func (p pki) writeKubeconfig(file, server, stem string) error {
	ca, err := os.ReadFile(p.CACert())
	if err != nil {
		return err
	}
	crt, err := os.ReadFile(p.path(stem + ".crt"))
	if err != nil {
		return err
	}
	key, err := os.ReadFile(p.path(stem + ".key"))
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["testbed"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos[stem] = &clientcmdapi.AuthInfo{ClientCertificateData: crt, ClientKeyData: key}
	cfg.Contexts["testbed"] = &clientcmdapi.Context{Cluster: "testbed", AuthInfo: stem, Namespace: "default"}
	cfg.CurrentContext = "testbed"
	tmp := file + ".tmp"
	if err := clientcmd.WriteToFile(*cfg, tmp); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		panic(err)
	}
	return n
}

func keyID(pub *ecdsa.PublicKey) []byte {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		panic(err)
	}
	sum := sha256.Sum256(der)
	return sum[:20]
}

func writeECKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "EC PRIVATE KEY", der, 0o600)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func readPEM(path, typ string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != typ {
		return nil, fmt.Errorf("%s: no %s PEM block", path, typ)
	}
	return block.Bytes, nil
}

func readCert(path string) (*x509.Certificate, error) {
	der, err := readPEM(path, "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func readECKey(path string) (*ecdsa.PrivateKey, error) {
	der, err := readPEM(path, "EC PRIVATE KEY")
	if err != nil {
		return nil, err
	}
	return x509.ParseECPrivateKey(der)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil || !errors.Is(err, os.ErrNotExist)
}
