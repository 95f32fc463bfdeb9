// Command regional-app is a small app to run beside each pgmesh node (one
// instance per region). Orders belong to the region they were placed in:
// pgmesh.set_home_column('orders', 'home') (or `pgmesh home-column orders
// home`) makes the database refuse writes to another region's orders, and
// the flyreplay middleware turns that refusal into a fly-replay to the
// order's home region.
//
//	CREATE TABLE orders (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
//	                     home text NOT NULL, item text NOT NULL, status text NOT NULL DEFAULT 'new');
//
//	DATABASE_URL=postgres://app@localhost/app NODE_NAME=sydney FLY_REGION=syd go run ./examples/regional-app
package main

import (
	"context"
	"encoding/json"
	"log"
	"net/http"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/flyreplay"
)

func main() {
	ctx := context.Background()
	db, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	node := os.Getenv("NODE_NAME") // this region's pgmesh node
	replay := flyreplay.Config{
		Region:       os.Getenv("FLY_REGION"),
		Regions:      map[string]string{"sydney": "syd", "tokyo": "nrt", "dallas": "dfw"},
		ReplayWindow: 5 * time.Second,
	}
	mux := http.NewServeMux()
	// Place an order here: it is homed in this region.
	mux.Handle("POST /orders", replay.Wrap(func(w http.ResponseWriter, r *http.Request) error {
		var id string
		if err := db.QueryRow(r.Context(), `INSERT INTO orders (home, item) VALUES ($1, $2) RETURNING id`,
			node, r.FormValue("item")).Scan(&id); err != nil {
			return err
		}
		w.WriteHeader(http.StatusCreated)
		return json.NewEncoder(w).Encode(map[string]string{"id": id})
	}))
	// Ship an order: only its home region may change it; elsewhere the
	// database says so and the request is replayed there.
	mux.Handle("POST /orders/{id}/ship", replay.Wrap(func(w http.ResponseWriter, r *http.Request) error {
		if _, err := db.Exec(r.Context(), `UPDATE orders SET status = 'shipped' WHERE id = $1`, r.PathValue("id")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}))
	log.Fatal(http.ListenAndServe(":8080", mux))
}
