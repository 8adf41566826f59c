// Command etcd is upstream etcd's server entry point, built from the Go module
// proxy so the local cluster needs no prebuilt binary download.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
