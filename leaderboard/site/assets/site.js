// Sort a table by a column on click (numbers by value, "-" last) and filter rows by the text typed above it.
function cellValue(row, column) {
  const text = row.children[column].textContent.trim();
  const number = parseFloat(text.replace('%', ''));
  return isNaN(number) ? text : number;
}
document.querySelectorAll('table.leaderboard').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (header) {
    header.addEventListener('click', function () {
      const column = Number(header.dataset.column);
      const ascending = !header.classList.contains('sorted-ascending');
      table.querySelectorAll('th').forEach(function (other) { other.classList.remove('sorted-ascending', 'sorted-descending'); });
      header.classList.add(ascending ? 'sorted-ascending' : 'sorted-descending');
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      rows.sort(function (a, b) {
        const x = cellValue(a, column), y = cellValue(b, column);
        if (x === '-' || y === '-') { return (x === '-') - (y === '-'); }
        const order = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
document.querySelectorAll('input.filter').forEach(function (input) {
  input.addEventListener('input', function () {
    const table = document.getElementById(input.dataset.table);
    const needle = input.value.toLowerCase();
    Array.from(table.tBodies[0].rows).forEach(function (row) {
      row.style.display = row.textContent.toLowerCase().includes(needle) ? '' : 'none';
    });
  });
});
