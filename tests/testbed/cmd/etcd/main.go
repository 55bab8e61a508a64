// Command etcd is the upstream etcd server (go.etcd.io/etcd/server/v3), at
// the version k8s.io/kubernetes itself pins, for the stoker test bed.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
