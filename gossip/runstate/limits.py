"""Every limit of the run-state layer, with the reason for its value.

Sizes are checked before any decoder (msgpack, pycrdt) sees the bytes: pycrdt pre-allocates from lying
length fields (6 bytes can cost 540 MB and 330 ms, measured: docs/design.md, "Measured facts"), so
nothing unchecked may reach it.
"""

# --- framing and decoding -------------------------------------------------------------------------
# One sync message; the largest legitimate one is a push of a few full chains or a 1,000-peer digest
# (about 30 KB). 1 MiB, the same cap as every control frame (transport/messages.py).
MAX_SYNC_MESSAGE_BYTES = 1 << 20
# One signed entry (a Yjs update plus 150 B of envelope). A delta is 20-100 B; a snapshot of one
# peer's document is a few KB; the run document with a large manifest stays far below this.
# The worst-case GIL stall of an apply is about 117 ms per 1.3 MB, so 256 KiB keeps it near 25 ms.
MAX_ENTRY_BYTES = 256 << 10
# One ephemeral record (heartbeat, throughput, loss): a handful of numbers.
MAX_RECORD_BYTES = 1024
# Entries, records and proofs in one push message: bounds the work one message can cause.
MAX_ITEMS_PER_PUSH = 512
# msgpack container limits for a sync message (the per-item bytes limits above bound the rest).
MAX_ARRAY_LEN = 4096
MAX_MAP_LEN = 64
# Nested Any values inside a Yjs update, and inside a record: our own writers never nest deeper than 4.
MAX_VALUE_DEPTH = 8

# --- Yjs update structure (checked by `yupdate.parse` before pycrdt sees bytes) ----------------------
# Structs in one update: a snapshot of a peer document holds a few dozen, the run document a few
# thousand at most (one per manifest file and config key).
MAX_STRUCTS = 20_000
# Delete-set ranges in one update.
MAX_DELETE_RANGES = 20_000
# A string inside an update (a key, an address, a reason).
MAX_STRING_BYTES = 64 << 10
# Clock values: Yjs varuints; we cap them at 2**53 so that no value overflows yrs or JavaScript.
MAX_CLOCK = (1 << 53) - 1

# --- documents --------------------------------------------------------------------------------------
# Documents (peer documents plus run documents) one replica keeps: a run of 1,000 peers uses about
# 1,000; the cap stops a flood of freshly generated keys from exhausting memory under an open
# admission rule.
MAX_DOCUMENTS = 4096
# Entries of one owner's current generation kept before the owner compacts into a new snapshot; a
# replica refuses chains longer than the hard cap (an owner that never compacts is misbehaving).
COMPACT_AFTER_ENTRIES = 64
MAX_CHAIN_ENTRIES = 256
# An owner also compacts once its chain outweighs this many times its snapshot (and this floor): a
# replica then holds at most a few times each document's live content, however long the run.
COMPACT_GROWTH = 4
COMPACT_MIN_BYTES = 1024
# Out-of-order entries held per owner while the missing ones are fetched, and in total.
MAX_PENDING_PER_OWNER = 32
MAX_PENDING_TOTAL = 4096
# Ban reasons and similar free text written into documents.
MAX_REASON_CHARS = 200
# Exclusion from pairing by evidence (RunState.excluded): a peer is excluded once this many distinct members
# (at least EVIDENCE_QUORUM_MIN, so no single accuser can exclude anyone, and a share of the members in a
# large run) publish evidence against it; an accuser with more than MAX_LONE_ACCUSATIONS accusations that
# nobody else backs loses its voice and is excluded itself (a false accusation costs the accuser).
EVIDENCE_QUORUM_MIN = 2
EVIDENCE_ACTIVE_ROUNDS = 100  # members count toward the share if their round is this close to the newest
# Evidence counts this many rounds after the round it names (the newest round any member published sets the
# clock): an excluded peer pairs again after it, and is excluded anew if it still misbehaves; a mistaken
# exclusion heals by itself.
EVIDENCE_TTL_ROUNDS = 200
EVIDENCE_QUORUM_SHARE = 0.25
MAX_LONE_ACCUSATIONS = 2
# Silence evidence (a partner that stays in the run but never answers) excludes for this many rounds after
# the newest accusation: long enough that a silent identity costs its partners a few rounds per exclusion,
# short enough that an honest peer whose daemon stalled for a while pairs again soon.
SILENCE_TTL_ROUNDS = 50
# Silence accusations one member keeps in its own document (the newest).
MAX_SILENCE_ENTRIES = 64
# Strikes (one refusal by a guard rule whose word holds alone: a flipped update, no update, a repeat): a
# member publishes, per partner, how many times its guard struck it within EVIDENCE_TTL_ROUNDS. A partner is
# excluded once STRIKES_TO_EXCLUDE strikes from at least the evidence quorum of distinct members are live,
# each member's count capped at MAX_STRIKES_COUNTED (so one member never makes the count alone). A
# receiver meets a given partner about once in R−1 rounds, so a guard alone rarely strikes one 3 times
# within its strike window; the run, which meets it every round, does. Honest partners were struck 0 times
# in 8,000 honest verdicts at R = 8 (bench.byzantine_long, two seeds) and 11 live swarms
# (bench.byzantine_live); 2 times in 5,680 at R = 16 (bench.byzantine --peers 16), under the quorum.
STRIKES_TO_EXCLUDE = 3
MAX_STRIKES_COUNTED = 2
MAX_STRIKE_ENTRIES = 64  # strike records one member keeps in its own document (the newest)

# --- sync timing (seconds of the caller's clock) ----------------------------------------------------
# Anti-entropy with one random peer this often: push-pull spreads a change to N peers in about
# log2(N) + ln(N) exchanges (Demers et al. 1987), about 17 for 1,000 peers.
ANTI_ENTROPY_INTERVAL_S = 5.0
ANTI_ENTROPY_FANOUT = 1
# New document entries are pushed at once to this many random peers (rumour mongering); anti-entropy
# repairs whatever the push misses.
PUSH_FANOUT = 3
# A heartbeat record is signed and pushed this often.
HEARTBEAT_INTERVAL_S = 10.0

# --- local failure detector --------------------------------------------------------------------------
# A peer whose heartbeat counter did not advance for this long is suspect, then dead. Heartbeats
# spread by anti-entropy, so the bounds allow a full epidemic (about 17 intervals of 5 s) plus slack.
SUSPECT_AFTER_S = 120.0
DEAD_AFTER_S = 300.0

# --- misbehaving senders ------------------------------------------------------------------------------
# Token buckets per sending connection: a sync peer sends about one message per second; bursts cover
# a push-pull exchange after a partition heals.
SENDER_MESSAGES_PER_S = 20.0
SENDER_MESSAGE_BURST = 200.0
SENDER_BYTES_PER_S = 256 << 10
SENDER_BYTES_BURST = 4 << 20
# Strikes (rejected messages or entries) before a sender is dropped, and how fast they are forgiven.
MAX_STRIKES = 10
STRIKE_DECAY_PER_S = 0.05
DROP_FOR_S = 600.0
# Senders tracked by the limiter (a connection that floods us with new identities stays bounded).
MAX_TRACKED_SENDERS = 8192
