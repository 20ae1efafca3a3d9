// Command goanchor is the users' Go design, the anchor of benchmarks/compare.py
// (system U): net/http answers GET /docs/<rest>?<query> with a 301 to
// https://docs.example.com/<rest>?<query> (as benchmarks/apps.py's raw does),
// puts one record per hit on a bounded channel, and a pool of workers produces
// them to Kafka with confluent-kafka-go (acks=all, idempotence on). One
// goroutine counts the delivery reports. When the channel is full the handler
// waits. On SIGTERM or SIGINT it stops serving, drains the channel, flushes,
// and prints its ledger to stderr:
//
//	ledger {"received": N, "delivered": N, "failed": 0, "dropped": 0}
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
)

const target = "https://docs.example.com/"

type record struct {
	ID        string `json:"id"`
	TS        string `json:"ts"`
	Path      string `json:"path"`
	Query     string `json:"query"`
	UserAgent string `json:"user_agent"`
}

type ledger struct {
	Received, Delivered, Failed, Dropped atomic.Int64
}

func (l *ledger) String() string {
	return fmt.Sprintf(`{"received": %d, "delivered": %d, "failed": %d, "dropped": %d}`,
		l.Received.Load(), l.Delivered.Load(), l.Failed.Load(), l.Dropped.Load())
}

// queue is the bounded channel between the handlers and the workers; put
// waits while it is full, and refuses once it is closed.
type queue struct {
	mu     sync.RWMutex
	closed bool
	ch     chan record
}

func (q *queue) put(r record) bool {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closed {
		return false
	}
	q.ch <- r
	return true
}

func (q *queue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	close(q.ch)
}

// uuid7 is an RFC 9562 version 7 UUID, as the service's record ids are.
func uuid7(now time.Time) string {
	var b [16]byte
	_, _ = rand.Read(b[6:])
	ms := uint64(now.UnixMilli())
	b[0], b[1], b[2], b[3], b[4], b[5] = byte(ms>>40), byte(ms>>32), byte(ms>>24), byte(ms>>16), byte(ms>>8), byte(ms)
	b[6] = 0x70 | b[6]&0x0f // version 7
	b[8] = 0x80 | b[8]&0x3f // variant 10
	var text [36]byte
	hex.Encode(text[0:8], b[0:4])
	hex.Encode(text[9:13], b[4:6])
	hex.Encode(text[14:18], b[6:8])
	hex.Encode(text[19:23], b[8:10])
	hex.Encode(text[24:], b[10:])
	text[8], text[13], text[18], text[23] = '-', '-', '-', '-'
	return string(text[:])
}

func handler(q *queue, l *ledger) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		rest, ok := strings.CutPrefix(r.URL.Path, "/docs/")
		if !ok {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		now := time.Now()
		hit := record{
			ID:        uuid7(now),
			TS:        now.UTC().Format("2006-01-02T15:04:05.000Z07:00"),
			Path:      r.URL.Path,
			Query:     r.URL.RawQuery,
			UserAgent: r.UserAgent(),
		}
		if q.put(hit) {
			l.Received.Add(1)
		} else {
			l.Dropped.Add(1) // answered after the channel closed
		}
		location := target + rest
		if r.URL.RawQuery != "" {
			location += "?" + r.URL.RawQuery
		}
		w.Header().Set("Location", location)
		w.WriteHeader(http.StatusMovedPermanently)
	}
}

// work produces the records of q until it is closed and drained.
func work(p *kafka.Producer, topic string, records <-chan record, l *ledger) {
	destination := kafka.TopicPartition{Topic: &topic, Partition: kafka.PartitionAny}
	for hit := range records {
		value, err := json.Marshal(hit)
		if err != nil {
			log.Printf("encode: %v", err)
			l.Dropped.Add(1)
			continue
		}
		message := &kafka.Message{TopicPartition: destination, Value: value}
		for {
			err = p.Produce(message, nil)
			var kerr kafka.Error
			if !errors.As(err, &kerr) || kerr.Code() != kafka.ErrQueueFull {
				break
			}
			time.Sleep(time.Millisecond) // librdkafka's queue is full: wait for deliveries
		}
		if err != nil {
			log.Printf("produce: %v", err)
			l.Dropped.Add(1)
		}
	}
}

// count reads the delivery reports until the producer closes its events channel.
func count(p *kafka.Producer, l *ledger) {
	for event := range p.Events() {
		switch e := event.(type) {
		case *kafka.Message:
			if e.TopicPartition.Error != nil {
				l.Failed.Add(1)
			} else {
				l.Delivered.Add(1)
			}
		case kafka.Error:
			log.Printf("kafka: %v", e)
		}
	}
}

func env(name, fallback string) string {
	if value, ok := os.LookupEnv(name); ok {
		return value
	}
	return fallback
}

func main() {
	listen := flag.String("listen", env("GOANCHOR_LISTEN", "127.0.0.1:8080"), "address to serve on")
	bootstrap := flag.String("bootstrap", env("BENCH_BOOTSTRAP", "localhost:9092"), "Kafka bootstrap servers")
	topic := flag.String("topic", env("BENCH_TOPIC", "hits"), "Kafka topic")
	workers := flag.Int("workers", runtime.NumCPU(), "producing goroutines")
	size := flag.Int("queue", 10000, "records the channel holds")
	grace := flag.Duration("grace", 5*time.Second, "for the HTTP server's shutdown, and again for the flush")
	flag.Parse()
	log.SetFlags(0)

	p, err := kafka.NewProducer(&kafka.ConfigMap{
		"bootstrap.servers":  *bootstrap,
		"acks":               "all",
		"enable.idempotence": true,
		"compression.type":   "lz4", // as the service's defaults
		"linger.ms":          5,
	})
	if err != nil {
		log.Fatalf("producer: %v", err)
	}
	var l ledger
	counted := make(chan struct{})
	go func() { count(p, &l); close(counted) }()
	q := &queue{ch: make(chan record, *size)}
	var pool sync.WaitGroup
	for range *workers {
		pool.Go(func() { work(p, *topic, q.ch, &l) })
	}

	server := &http.Server{Addr: *listen, Handler: handler(q, &l), ReadHeaderTimeout: *grace}
	stop, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- server.ListenAndServe() }()
	log.Printf("serving on http://%s, producing to %s on %s", *listen, *topic, *bootstrap)
	select {
	case <-stop.Done():
	case err = <-served:
		log.Printf("serve: %v", err)
	}

	shutdown, done := context.WithTimeout(context.Background(), *grace)
	defer done()
	if err := server.Shutdown(shutdown); err != nil {
		log.Printf("shutdown: %v", err)
	}
	q.close()
	pool.Wait()
	if left := p.Flush(int(grace.Milliseconds())); left > 0 {
		log.Printf("flush: %d records still in flight", left)
	}
	p.Close() // closes the events channel: count returns
	<-counted
	log.Printf("ledger %s", &l)
	if l.Received.Load() != l.Delivered.Load() {
		os.Exit(1)
	}
}
