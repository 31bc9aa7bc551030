"""Kafka connection settings, topic creation and producer construction, shared by every part.

Works on Apache Kafka and on the embedded tansu broker (which has no idempotent producer or
transactions, so `idempotent` is off unless asked for). Secrets come from the environment or
files, and never appear in `repr` or logs.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from runtime.errors import BrokerError, ConfigError
from runtime.options import EnvSecret, add_env_flag, add_env_option, add_env_secret
from schemas import events

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SASL_PASSWORD_ENV = "GPULEDGER_KAFKA_SASL_PASSWORD"
SASL_PASSWORD_FILE_ENV = "GPULEDGER_KAFKA_SASL_PASSWORD_FILE"


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap: str = DEFAULT_BOOTSTRAP
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    idempotent: bool = False  # only on brokers that support it (Apache Kafka, not tansu)

    def client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs


def add_kafka_options(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The Kafka connection of every part that talks to Kafka; the SASL password comes from
    the environment or a file only."""
    add_env_option(
        parser,
        env,
        "--kafka",
        env="GPULEDGER_KAFKA_BOOTSTRAP",
        default=DEFAULT_BOOTSTRAP,
        metavar="HOST:PORT[,HOST:PORT]",
        help=f"Kafka bootstrap servers (default {DEFAULT_BOOTSTRAP})",
    )
    add_env_option(
        parser,
        env,
        "--kafka-security-protocol",
        env="GPULEDGER_KAFKA_SECURITY_PROTOCOL",
        default="PLAINTEXT",
        type=str.upper,
        choices=SECURITY_PROTOCOLS,
        metavar="PROTOCOL",
        help=f"{', '.join(SECURITY_PROTOCOLS)} (default PLAINTEXT); SASL_* also take the "
        "mechanism, username and password below",
    )
    add_env_option(
        parser,
        env,
        "--kafka-sasl-mechanism",
        env="GPULEDGER_KAFKA_SASL_MECHANISM",
        type=str.upper,
        choices=SASL_MECHANISMS,
        metavar="MECHANISM",
        help=f"{', '.join(SASL_MECHANISMS)} (default PLAIN)",
    )
    add_env_option(
        parser,
        env,
        "--kafka-sasl-username",
        env="GPULEDGER_KAFKA_SASL_USERNAME",
        metavar="USER",
        help="SASL username",
    )
    add_env_secret(parser, env, env=SASL_PASSWORD_ENV, dest="kafka_sasl_password")
    add_env_option(
        parser,
        env,
        "--kafka-sasl-password-file",
        env=SASL_PASSWORD_FILE_ENV,
        secret=True,
        metavar="FILE",
        help="file holding the SASL password (a mounted secret); it wins over "
        f"{SASL_PASSWORD_ENV}, which holds the password itself",
    )
    add_env_option(
        parser,
        env,
        "--kafka-ssl-cafile",
        env="GPULEDGER_KAFKA_SSL_CAFILE",
        metavar="FILE",
        help="CA bundle for SSL and SASL_SSL (default: the system's)",
    )
    add_env_flag(
        parser,
        env,
        "--kafka-idempotent",
        env="GPULEDGER_KAFKA_IDEMPOTENT",
        help="idempotent producer, on brokers that support it (Apache Kafka, not tansu); "
        "the variable takes 1/true/yes or 0/false/no (default off)",
    )


def kafka_settings_from(args: argparse.Namespace) -> KafkaSettings:
    """The settings of the flags `add_kafka_options` declared (variables as their defaults)."""
    secret: EnvSecret | None = getattr(args, "kafka_sasl_password", None)
    password = secret.reveal() if secret is not None else None
    password_file: str | None = args.kafka_sasl_password_file
    if password_file:
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the SASL password file (--kafka-sasl-password-file or "
                f"{SASL_PASSWORD_FILE_ENV}): {exc.strerror}"
            ) from exc
    bootstrap = str(args.kafka).strip()
    if not bootstrap or any(":" not in hp for hp in bootstrap.split(",")):
        raise ConfigError(f"--kafka must be a HOST:PORT list, got {bootstrap!r}")
    return KafkaSettings(
        bootstrap=bootstrap,
        security_protocol=args.kafka_security_protocol,
        sasl_mechanism=args.kafka_sasl_mechanism,
        sasl_username=args.kafka_sasl_username,
        sasl_password=password,
        ssl_cafile=args.kafka_ssl_cafile,
        idempotent=bool(args.kafka_idempotent),
    )


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int = 1
    compacted: bool = False
    replication_factor: int = 1
    retention_ms: int | None = None
    min_compaction_lag_ms: int | None = None  # a compacted record stays at least this long

    def new_topic(self) -> NewTopic:
        configs: dict[str, str] = {}
        if self.compacted:
            configs["cleanup.policy"] = "compact"
        if self.retention_ms is not None:
            configs["retention.ms"] = str(self.retention_ms)
        if self.min_compaction_lag_ms is not None:
            configs["min.compaction.lag.ms"] = str(self.min_compaction_lag_ms)
        return NewTopic(
            name=self.name,
            num_partitions=self.partitions,
            replication_factor=self.replication_factor,
            topic_configs=configs,
        )


# The pods topic is compacted, but a pod event stays until the event that supersedes it is a
# week old (Kafka compacts a record only once a later one of its key is past this lag): a week
# is Kafka's default retention, that of the samples topic, so a replay of any sample still in
# Kafka sees every pod event live processing saw. It must be at least the worker's retention
# (1 h by default), which a restart or rebalance replays.
PODS_MIN_COMPACTION_LAG_MS = 7 * 24 * 3600 * 1000


def default_topics(partitions: int = 1, replication_factor: int = 1) -> list[TopicSpec]:
    """Every topic of design §2; the pods and nodes topics are compacted, after a week (a
    worker down for less than that still stores every node event)."""
    rf = replication_factor
    return [
        TopicSpec(events.GPU_SAMPLES_TOPIC, partitions, replication_factor=rf),
        TopicSpec(
            events.PODS_TOPIC,
            partitions,
            compacted=True,
            replication_factor=rf,
            min_compaction_lag_ms=PODS_MIN_COMPACTION_LAG_MS,
        ),
        TopicSpec(
            events.NODES_TOPIC,
            partitions,
            compacted=True,
            replication_factor=rf,
            min_compaction_lag_ms=PODS_MIN_COMPACTION_LAG_MS,
        ),
        TopicSpec(events.TOKENS_TOPIC, partitions, replication_factor=rf),
        TopicSpec(events.COST_WINDOWS_TOPIC, partitions, replication_factor=rf),
        TopicSpec(events.TOKEN_COST_WINDOWS_TOPIC, partitions, replication_factor=rf),
        TopicSpec(events.DEAD_LETTER_TOPIC, 1, replication_factor=rf),
    ]


async def ensure_topics(settings: KafkaSettings, specs: Iterable[TopicSpec]) -> list[str]:
    """Create the topics that are missing; returns the names created."""
    admin = AIOKafkaAdminClient(**settings.client_kwargs())
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        created = []
        for spec in missing:
            try:
                await admin.create_topics([spec.new_topic()])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another part created it first
        return created
    except KafkaError as exc:
        raise BrokerError(f"cannot create topics on {settings.bootstrap}: {exc}") from exc
    finally:
        await admin.close()


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    kwargs: dict[str, Any] = {
        **settings.client_kwargs(),
        "acks": "all",
        "linger_ms": 20,
        "enable_idempotence": settings.idempotent,
        "compression_type": None,
    }
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


async def partition_counts(
    settings: KafkaSettings, topics: Iterable[str], *, wait_s: float = 15.0
) -> dict[str, int]:
    """Number of partitions of each topic (which must exist). A topic created a moment ago may
    not list its partitions yet (the controller is still propagating its metadata): it is asked
    again, with growing pauses, for up to `wait_s` before it counts as missing."""
    wanted = list(topics)
    deadline = asyncio.get_running_loop().time() + wait_s
    pause = 0.1
    while True:
        admin = AIOKafkaAdminClient(**settings.client_kwargs())
        try:
            await admin.start()
            described = await admin.describe_topics(wanted)
        except KafkaError as exc:
            raise BrokerError(f"cannot describe topics on {settings.bootstrap}: {exc}") from exc
        finally:
            await admin.close()
        counts = {d["topic"]: len(d["partitions"]) for d in described if d.get("partitions")}
        missing = [t for t in wanted if t not in counts]
        if not missing:
            return counts
        if asyncio.get_running_loop().time() + pause > deadline:
            raise BrokerError(f"topics without partitions: {', '.join(missing)}")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)
