// Command scrapecheck scrapes one /metrics URL the way Prometheus does and prints, as
// JSON, what Prometheus's own parsers make of the answer. Test tooling, not product.
//
//	scrapecheck [-accept HEADER] URL
//
// The answer's Content-Type picks the parser, as in Prometheus's scrape loop
// (model/textparse.New): OpenMetrics or the text format. Any parse error fails the
// command (exit 1): Prometheus would fail the scrape. For the text format the families
// are read with expfmt.TextParser too (what promtool and client_golang use), which
// reports a sample whose name does not match its family's TYPE as an untyped family of
// its own: exactly how a counter typed without `_total` goes wrong.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"mime"
	"net/http"
	"os"
	"sort"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/textparse"
)

// What Prometheus 3 sends when every scrape protocol is allowed (OpenMetrics preferred).
const prometheusAccept = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6," +
	"application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4," +
	"text/plain;version=0.0.4;q=0.3,*/*;q=0.2"

type sample struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels"`
	Value  float64           `json:"value"`
}

type family struct {
	Name    string   `json:"name"`
	Type    string   `json:"type"`
	Help    string   `json:"help"`
	Samples []sample `json:"samples"`
}

type report struct {
	ContentType string   `json:"contentType"`
	Parser      string   `json:"parser"`
	Families    []family `json:"families"`
}

func main() {
	accept := flag.String("accept", prometheusAccept, "the Accept header to scrape with")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: scrapecheck [-accept HEADER] URL")
		os.Exit(2)
	}
	out, err := check(flag.Arg(0), *accept)
	if err != nil {
		fmt.Fprintln(os.Stderr, "scrapecheck:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "scrapecheck:", err)
		os.Exit(1)
	}
}

func check(url, accept string) (*report, error) {
	request, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	request.Header.Set("Accept", accept)
	client := http.Client{Timeout: 10 * time.Second}
	response, err := client.Do(request)
	if err != nil {
		return nil, err
	}
	defer response.Body.Close()
	body, err := io.ReadAll(response.Body)
	if err != nil {
		return nil, err
	}
	if response.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s answered %s", url, response.Status)
	}
	contentType := response.Header.Get("Content-Type")
	// No fallback: an answer whose Content-Type Prometheus does not know fails, as in a
	// scrape configured without fallback_scrape_protocol.
	parser, err := textparse.New(body, contentType, labels.NewSymbolTable(), textparse.ParserOptions{})
	if err != nil || parser == nil {
		return nil, fmt.Errorf("no Prometheus parser for Content-Type %q: %v", contentType, err)
	}
	families, err := readWithScrapeParser(parser)
	if err != nil {
		return nil, fmt.Errorf("Prometheus's %s parser rejects the answer: %w", parserName(contentType), err)
	}
	if parserName(contentType) == "text" {
		if families, err = readWithTextParser(body); err != nil {
			return nil, fmt.Errorf("expfmt's text parser rejects the answer: %w", err)
		}
	}
	return &report{ContentType: contentType, Parser: parserName(contentType), Families: families}, nil
}

func parserName(contentType string) string {
	mediaType, _, _ := mime.ParseMediaType(contentType)
	if mediaType == "application/openmetrics-text" {
		return "openmetrics"
	}
	return "text"
}

// readWithScrapeParser reads every entry; a sample belongs to the family of the TYPE line
// before it (OpenMetrics requires that), and samples before any TYPE are untyped.
func readWithScrapeParser(parser textparse.Parser) ([]family, error) {
	var families []family
	current := -1
	for {
		entry, err := parser.Next()
		if errors.Is(err, io.EOF) {
			return families, nil
		}
		if err != nil {
			return nil, err
		}
		switch entry {
		case textparse.EntryType:
			name, kind := parser.Type()
			families = append(families, family{Name: string(name), Type: string(kind)})
			current = len(families) - 1
		case textparse.EntryHelp:
			name, help := parser.Help()
			if current >= 0 && families[current].Name == string(name) {
				families[current].Help = string(help)
			}
		case textparse.EntrySeries:
			_, _, value := parser.Series()
			var set labels.Labels
			parser.Labels(&set)
			s := sample{Name: set.Get(model.MetricNameLabel), Labels: map[string]string{}, Value: value}
			set.Range(func(l labels.Label) {
				if l.Name != model.MetricNameLabel {
					s.Labels[l.Name] = l.Value
				}
			})
			if current < 0 {
				families = append(families, family{Name: s.Name, Type: "unknown"})
				current = len(families) - 1
			}
			families[current].Samples = append(families[current].Samples, s)
		}
	}
}

func readWithTextParser(body []byte) ([]family, error) {
	parser := expfmt.NewTextParser(model.LegacyValidation)
	parsed, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	var families []family
	for name, mf := range parsed {
		f := family{Name: name, Type: strings.ToLower(mf.GetType().String()), Help: mf.GetHelp()}
		for _, metric := range mf.GetMetric() {
			f.Samples = append(f.Samples, samplesOf(name, mf.GetType(), metric)...)
		}
		families = append(families, f)
	}
	sort.Slice(families, func(i, j int) bool { return families[i].Name < families[j].Name })
	return families, nil
}

// samplesOf flattens one expfmt metric into the sample lines it was read from.
func samplesOf(name string, kind dto.MetricType, metric *dto.Metric) []sample {
	base := map[string]string{}
	for _, pair := range metric.GetLabel() {
		base[pair.GetName()] = pair.GetValue()
	}
	with := func(key, value string) map[string]string {
		labels := map[string]string{key: value}
		for k, v := range base {
			labels[k] = v
		}
		return labels
	}
	switch kind {
	case dto.MetricType_COUNTER:
		return []sample{{Name: name, Labels: base, Value: metric.GetCounter().GetValue()}}
	case dto.MetricType_GAUGE:
		return []sample{{Name: name, Labels: base, Value: metric.GetGauge().GetValue()}}
	case dto.MetricType_HISTOGRAM:
		h := metric.GetHistogram()
		out := []sample{
			{Name: name + "_sum", Labels: base, Value: h.GetSampleSum()},
			{Name: name + "_count", Labels: base, Value: float64(h.GetSampleCount())},
		}
		for _, bucket := range h.GetBucket() {
			le := model.FloatString(bucket.GetUpperBound()).String()
			out = append(out, sample{Name: name + "_bucket", Labels: with("le", le), Value: float64(bucket.GetCumulativeCount())})
		}
		return out
	default:
		return []sample{{Name: name, Labels: base, Value: metric.GetUntyped().GetValue()}}
	}
}
