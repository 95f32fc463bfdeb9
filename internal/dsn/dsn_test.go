package dsn

import "testing"

func TestStripPassword(t *testing.T) {
	cases := map[string]string{
		"postgres://app:s3cret@db:5432/app?sslmode=require": "postgres://app@db:5432/app?sslmode=require",
		"postgres://app@db/app?password=s3cret":             "postgres://app@db/app",
		"host=db user=app password=s3cret dbname=app":       "host=db user=app  dbname=app",
		"host=db password='a b\\' c' dbname=app":            "host=db  dbname=app",
		"host=db dbname=app":                                "host=db dbname=app",
	}
	for in, want := range cases {
		if got := StripPassword(in); got != want {
			t.Errorf("StripPassword(%q) = %q, want %q", in, got, want)
		}
		if HasPassword(want) {
			t.Errorf("HasPassword(%q) = true after stripping", want)
		}
	}
}

func TestDescribeHasNoSecret(t *testing.T) {
	got := Describe("postgres://app:s3cret@db.example:6432/sales")
	if got != "app@db.example:6432/sales" {
		t.Fatalf("Describe = %q", got)
	}
}
