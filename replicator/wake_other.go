//go:build !unix

package replicator

func setRcvLowat(uintptr, int) {}
