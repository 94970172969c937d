"""Users, roles and cluster membership: replicated, last writer wins, tombstoned deletes."""

from __future__ import annotations

from typing import Any

from storage.records import Member, Notice, Role, User
from storage.store import Store
from storage.tables import MEMBERS, ROLES, USERS, TableSpec, member_from, role_from, user_from

__all__ = ["Accounts"]


class Accounts:
    """Typed access to ``users``, ``roles`` and ``members`` of a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _put(self, spec: TableSpec, row: dict[str, Any], user: str | None) -> dict[str, Any]:
        async with self.store.tx() as tx:
            stored = await self.store.put_row(tx, spec, row, user=user)
            tx.notify(Notice(spec.name, spec.key(stored)))
        return stored

    async def _live(self, spec: TableSpec, key: str) -> dict[str, Any] | None:
        row = await self.store.get_row(spec, (key,))
        return None if row is None or row["deleted"] else row

    async def _all(self, spec: TableSpec) -> list[dict[str, Any]]:
        rows = await self.store.db.fetchall(
            f"SELECT * FROM {spec.name} WHERE deleted = 0 ORDER BY {spec.key_cols[0]}"
        )
        return [spec.from_sql(r) for r in rows]

    # -- users ------------------------------------------------------------------------

    async def get_user(self, username: str) -> User | None:
        row = await self._live(USERS, username)
        return None if row is None else user_from(row)

    async def user_known(self, username: str) -> bool:
        """Whether the cluster has (or had: a deleted user leaves a tombstone) this user."""
        return await self.store.get_row(USERS, (username,)) is not None

    async def list_users(self) -> list[User]:
        return [user_from(r) for r in await self._all(USERS)]

    async def put_user(
        self, username: str, *, password_hash: str, role: str, active: bool = True, by: str | None
    ) -> User:
        row = {
            "username": username,
            "password_hash": password_hash,
            "role": role,
            "active": active,
            "deleted": False,
        }
        return user_from(await self._put(USERS, row, by))

    async def delete_user(self, username: str, *, by: str | None) -> bool:
        current = await self._live(USERS, username)
        if current is None:
            return False
        await self._put(USERS, {**current, "deleted": True, "password_hash": ""}, by)
        return True

    # -- roles ------------------------------------------------------------------------

    async def get_role(self, role: str) -> Role | None:
        row = await self._live(ROLES, role)
        return None if row is None else role_from(row)

    async def list_roles(self) -> list[Role]:
        return [role_from(r) for r in await self._all(ROLES)]

    async def put_role(self, role: str, permission: dict[str, Any], *, by: str | None) -> Role:
        return role_from(
            await self._put(ROLES, {"role": role, "permission": permission, "deleted": False}, by)
        )

    async def delete_role(self, role: str, *, by: str | None) -> bool:
        current = await self._live(ROLES, role)
        if current is None:
            return False
        await self._put(ROLES, {**current, "deleted": True}, by)
        return True

    async def role_in_use(self, role: str) -> bool:
        row = await self.store.db.fetchone(
            "SELECT 1 FROM users WHERE role = ? AND deleted = 0 LIMIT 1", (role,)
        )
        return row is not None

    # -- members ----------------------------------------------------------------------

    async def get_member(self, name: str) -> Member | None:
        row = await self.store.get_row(MEMBERS, (name,))
        return None if row is None else member_from(row)

    async def list_members(self, *, include_deleted: bool = False) -> list[Member]:
        if include_deleted:
            rows = await self.store.db.fetchall("SELECT * FROM members ORDER BY name")
            return [member_from(MEMBERS.from_sql(r)) for r in rows]
        return [member_from(r) for r in await self._all(MEMBERS)]

    async def put_member(self, name: str, url: str, *, by: str | None) -> Member:
        return member_from(
            await self._put(MEMBERS, {"name": name, "url": url, "deleted": False}, by)
        )

    async def delete_member(self, name: str, *, by: str | None) -> bool:
        current = await self._live(MEMBERS, name)
        if current is None:
            return False
        await self._put(MEMBERS, {**current, "deleted": True}, by)
        return True
