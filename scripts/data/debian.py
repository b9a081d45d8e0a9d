"""Builds the bundled test collection from Debian's package descriptions (real text no one here wrote).

    python scripts/data/debian.py [--lists DIR] [--out data/debian]

Without --lists it runs `apt-get -o Acquire::Languages=en update` into a private directory (needs
apt and the network to a Debian mirror) and reads the `bookworm main` lists: `Translation-en`
(synopsis + long description per package) and `Packages` (each binary package's source package).

- Passages: long descriptions (one line each; paragraph breaks become " "); docid = package name.
- Queries: synopses (a known-item task like MS MARCO's sparse judgments); qid = package name.
- Graded qrels: the package itself 2; a package whose long description is the same text 2 (no
  system can tell them apart); a package of the same source whose description is nearly the same
  (word-trigram Jaccard >= 0.5) 1.
- Left out: transitional/dummy packages, descriptions under 8 words, boilerplate texts shared by
  more than 3 packages (as passages and queries), and queries whose synopsis other packages share.
- Splits by a hash of the source package (siblings never straddle train and test): test 10%,
  dev 10%, train 80%.

Writes collection.tsv.zst, queries.{train,dev,test}.tsv.zst, qrels.{train,dev,test}.txt.zst (zstd
level 19, via pyarrow; `zstdcat` reads them, and so does every distill command) and stats.json. Needs pyarrow (for zstd) and Python 3.11.
"""
import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import tempfile


def apt_lists(dest):
    for d in ("partial",):
        os.makedirs(os.path.join(dest, "lists", d), exist_ok=True)
    os.makedirs(os.path.join(dest, "cache", "archives", "partial"), exist_ok=True)
    subprocess.run(
        ["apt-get", "-o", "Acquire::Languages=en", "-o", f"Dir::State::Lists={dest}/lists",
         "-o", f"Dir::Cache={dest}/cache", "-o", "APT::Get::List-Cleanup=0", "update"],
        check=True,
    )
    return os.path.join(dest, "lists")


def read_list(lists, suffix):
    def stem(n):
        return re.sub(r"\.(lz4|xz|gz|bz2|zst)$", "", n)

    names = [n for n in os.listdir(lists) if "_dists_bookworm_main_" in n and stem(n).endswith(suffix)]
    if not names:
        raise SystemExit(f"no bookworm main {suffix} list in {lists}")
    path = os.path.join(lists, sorted(names)[0])
    # apt-helper decompresses whatever apt stored (.lz4, .xz, .gz, plain).
    out = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], check=True, capture_output=True)
    return out.stdout.decode("utf-8", errors="replace")


def stanzas(text):
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.split("\n"):
            if line.startswith(" ") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def long_text(description):
    lines = description.split("\n")[1:]
    words = []
    for line in lines:
        line = line.strip()
        if line == ".":
            continue
        words.append(line)
    return " ".join(" ".join(words).split())


def norm_words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def trigrams(words):
    return {tuple(words[i:i + 3]) for i in range(max(len(words) - 2, 1))}


def jaccard(a, b):
    return len(a & b) / max(len(a | b), 1)


def split_of(source):
    h = int(hashlib.sha1(source.encode()).hexdigest(), 16) % 10
    return "test" if h == 0 else "dev" if h == 1 else "train"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lists", help="apt lists directory (default: run apt-get update into a temp dir)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "data", "debian"))
    a = ap.parse_args()
    lists = a.lists or apt_lists(tempfile.mkdtemp(prefix="distill-apt-"))
    source_of, section_of = {}, {}
    for f in stanzas(read_list(lists, "Packages")):
        pkg = f.get("Package")
        if pkg:
            source_of[pkg] = f.get("Source", pkg).split(" ")[0]
            section_of[pkg] = f.get("Section", "")
    packages = {}
    skipped = collections.Counter()
    for f in stanzas(read_list(lists, "Translation-en")):
        pkg, desc = f.get("Package"), f.get("Description-en")
        if not pkg or not desc or pkg not in source_of:
            skipped["not in Packages"] += 1
            continue
        synopsis = desc.split("\n")[0].strip()
        text = long_text(desc)
        if re.search(r"transitional|dummy package", synopsis + " " + text[:200], re.I):
            skipped["transitional or dummy"] += 1
            continue
        if len(text.split()) < 8:
            skipped["description under 8 words"] += 1
            continue
        packages[pkg] = (synopsis, text)
    by_text = collections.defaultdict(list)
    for pkg, (_, text) in packages.items():
        by_text[" ".join(norm_words(text))].append(pkg)
    for group in by_text.values():
        if len(group) > 3:
            skipped["boilerplate description (shared by > 3)"] += len(group)
            for pkg in group:
                del packages[pkg]
    by_synopsis = collections.Counter(s.lower() for s, _ in packages.values())
    by_source = collections.defaultdict(list)
    for pkg in packages:
        by_source[source_of[pkg]].append(pkg)
    shingles = {pkg: trigrams(norm_words(t)) for pkg, (_, t) in packages.items()}
    normalized = {pkg: " ".join(norm_words(t)) for pkg, (_, t) in packages.items()}

    os.makedirs(a.out, exist_ok=True)
    import pyarrow as pa

    docs = sorted(packages)
    collection = "".join(f"{p}\t{packages[p][1]}\n" for p in docs).encode()
    codec = pa.Codec("zstd", compression_level=19)
    with open(os.path.join(a.out, "collection.tsv.zst"), "wb") as f:
        f.write(codec.compress(collection, asbytes=True))
    stats = {"packages_read": len(source_of), "documents": len(docs), "skipped": dict(skipped),
             "collection_bytes": len(collection), "splits": {}}
    queries = collections.defaultdict(list)
    qrels = collections.defaultdict(list)
    ambiguous = 0
    for p in docs:
        synopsis = packages[p][0]
        if by_synopsis[synopsis.lower()] > 1:
            ambiguous += 1
            continue
        split = split_of(source_of[p])
        queries[split].append((p, synopsis))
        judged = {p: 2}
        for other in by_text[normalized[p]]:
            if other in packages:
                judged[other] = 2
        for other in by_source[source_of[p]]:
            if other not in judged and jaccard(shingles[p], shingles[other]) >= 0.5:
                judged[other] = 1
        for d, rel in sorted(judged.items()):
            qrels[split].append((p, d, rel))
    stats["ambiguous_synopsis_queries_dropped"] = ambiguous
    def write_zst(name, lines):
        with open(os.path.join(a.out, name), "wb") as f:
            f.write(codec.compress("".join(lines).encode(), asbytes=True))

    for split in ("train", "dev", "test"):
        write_zst(f"queries.{split}.tsv.zst", (f"{q}\t{text}\n" for q, text in queries[split]))
        write_zst(f"qrels.{split}.txt.zst", (f"{q} 0 {d} {rel}\n" for q, d, rel in qrels[split]))
        rels = collections.Counter(rel for _, _, rel in qrels[split])
        per_q = collections.Counter(q for q, _, _ in qrels[split])
        stats["splits"][split] = {
            "queries": len(queries[split]),
            "judgments_rel2": rels[2],
            "judgments_rel1": rels[1],
            "queries_with_more_than_one_relevant": sum(1 for n in per_q.values() if n > 1),
        }
    words = [len(packages[p][1].split()) for p in docs]
    qwords = [len(s.split()) for s, _ in packages.values()]
    stats["passage_words_mean"] = round(sum(words) / len(words), 1)
    stats["passage_words_median"] = sorted(words)[len(words) // 2]
    stats["query_words_mean"] = round(sum(qwords) / len(qwords), 1)
    with open(os.path.join(a.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
