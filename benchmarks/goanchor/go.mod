module redirect_logger/benchmarks/goanchor

go 1.25

require github.com/confluentinc/confluent-kafka-go/v2 v2.11.1
